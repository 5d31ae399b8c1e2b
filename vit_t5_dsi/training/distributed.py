"""What every process of a distributed run must agree on, decided once on the main process and shared.

k-means, BPE training and float reductions can differ between processes; a run whose ranks train on different
ids or token ids is silently wrong, so such state is computed on the main process, sent to the others, and
checked to be identical everywhere by a digest.
"""

from __future__ import annotations

import hashlib
import os
import json
from typing import Any


def _state():
    from accelerate import PartialState

    return PartialState()


def broadcast_from_main(value: Any) -> Any:
    """The main process's `value` on every process (pickled; a no-op in a single process)."""
    state = _state()
    if state.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    payload = [value if state.is_main_process else None]
    broadcast_object_list(payload, from_process=0)
    return payload[0]


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def check_identical_on_every_process(value: Any, what: str) -> str:
    """The digest of `value`, after checking that every process holds the same one (RuntimeError if not)."""
    mine = digest(value)
    state = _state()
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        digests = gather_object([mine])
        if len(set(digests)) != 1:
            raise RuntimeError(f"The processes disagree on the {what}: digests by rank {digests}.")
    return mine


def apply_collective_timeout(seconds: float) -> bool:
    """Make every collective of this run's process group give up after `seconds` (--ddp_timeout), and explain
    such a failure in one line before its traceback. Returns whether a process group was there to set.

    transformers passes --ddp_timeout to the process group only for GPU backends: with --use_cpu (gloo) the group
    keeps torch's 30-minute default, so a process whose peer hangs (stopped, swapped out, deadlocked) would wait
    that long whatever the flag says. A peer that dies is noticed sooner: the launcher (accelerate launch,
    torchrun) stops the others within seconds, and a collective on a closed connection fails at once."""
    import datetime
    import sys

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    dist.distributed_c10d._get_default_group().set_timeout(datetime.timedelta(seconds=seconds))
    previous = sys.excepthook

    def explain(kind, error, traceback):
        text = str(error).lower()
        # gloo words a timeout "Timed out ..." or, when it strikes inside backward's all-reduce, "Application
        # timeout caused pair closure"
        timed_out = "timed out" in text or "timeout" in text
        if isinstance(error, RuntimeError) and (timed_out or "connection closed by peer" in text
                                                or "connection reset by peer" in text):
            print(f"rank {dist.get_rank()}: another process of this run stopped answering (a collective "
                  f"{'waited --ddp_timeout ' + format(seconds, 'g') + ' s' if timed_out else 'lost its peer'}"
                  "); this process stops too. Resume from the last checkpoint with --resume_from_checkpoint "
                  "latest.", file=sys.stderr, flush=True)
        previous(kind, error, traceback)

    sys.excepthook = explain
    return True


def local_process_count() -> int:
    """Training processes on this machine (`LOCAL_WORLD_SIZE`, set by `accelerate launch` and `torchrun`)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def end_distributed_run() -> None:
    """Wait for every process, then tear the process group down before the interpreter exits.

    A process group left alive at exit is destroyed during interpreter shutdown, while its communication threads
    may still be joinable; C++ then calls std::terminate ("terminate called without an active exception") and
    the process dies with SIGABRT after all its work is done, which a scheduler counts as a failed job.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        state = _state()
        state.wait_for_everyone()
        state.destroy_process_group()


__all__ = ["local_process_count", "broadcast_from_main", "digest", "check_identical_on_every_process",
           "apply_collective_timeout", "end_distributed_run"]
