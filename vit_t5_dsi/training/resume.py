"""`--resume_from_checkpoint latest`: the one command that resumes a run stopped at any moment (killed by a
scheduler or the OOM killer, or by `fault_points` in the tests)."""

from __future__ import annotations

import glob
import logging
import os
import shutil

logger = logging.getLogger(__name__)

LATEST = "latest"


def resolve_latest_checkpoint(training_args) -> None:
    """`--resume_from_checkpoint latest`: the last complete `checkpoint-N` in --output_dir (one a run was killed
    while writing is skipped), or, when there is none, no checkpoint: the run then starts as the same command
    without the flag would (a --dense_first stage resumes or is reused; any other non-empty --output_dir is
    refused). The one command that resumes a run stopped at any moment."""
    if str(training_args.resume_from_checkpoint or "").lower() != LATEST:
        return
    from .dense_stage import last_checkpoint

    found = last_checkpoint(training_args.output_dir)
    logger.info("--resume_from_checkpoint latest: %s", found or f"no complete checkpoint in {training_args.output_dir}"
                ", starting the run")
    training_args.resume_from_checkpoint = found
    if found is None and training_args.process_index == 0:
        remove_unfinished_start(training_args.output_dir)
    if found is None and training_args.world_size > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def remove_unfinished_start(output_dir: str) -> list[str]:
    """What a run killed before its first complete checkpoint leaves besides its dense stage: checkpoint folders
    it did not finish and the pseudo-queries of a refresh before them. Removed only when that is all there is,
    so `latest` can start the run again; anything else (an earlier run's results) stays and is refused."""
    from .trainer import checkpoint_is_complete

    if not os.path.isdir(output_dir):
        return []
    unfinished = [path for path in glob.glob(os.path.join(output_dir, "checkpoint-*"))
                  if not checkpoint_is_complete(path)]
    leftovers = unfinished + [os.path.join(output_dir, n) for n in ("pseudo_queries.jsonl",)
                              if os.path.isfile(os.path.join(output_dir, n))]
    others = set(os.listdir(output_dir)) - {os.path.basename(p) for p in leftovers} - {"dual_encoder"}
    if others or not leftovers:
        return []
    for path in leftovers:
        shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
    logger.warning("--resume_from_checkpoint latest: no complete checkpoint in %s; removed what the interrupted "
                   "run left before its first one (%s) and start it again.", output_dir,
                   ", ".join(sorted(os.path.basename(p) for p in leftovers)))
    return leftovers


__all__ = ["LATEST", "resolve_latest_checkpoint", "remove_unfinished_start"]
