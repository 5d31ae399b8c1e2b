"""What every process of a distributed run must agree on, decided once on the main process and shared.

k-means, BPE training and float reductions can differ between processes; a run whose ranks train on different
ids or token ids is silently wrong, so such state is computed on the main process, sent to the others, and
checked to be identical everywhere by a digest.
"""

from __future__ import annotations

import hashlib
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


__all__ = ["broadcast_from_main", "digest", "check_identical_on_every_process", "end_distributed_run"]
