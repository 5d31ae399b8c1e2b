"""Decide, before a run writes anything, what happens to what its output directory already holds.

A non-empty directory is refused unless the run resumes from one of its checkpoints or is told to overwrite it;
overwriting removes the earlier run's results, index and checkpoints first, so a new run never merges its
metrics into an old `all_results.json` nor leaves an old `image_index.json` beside new weights.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil

from ..checkpoint.checkpoint_io import DUAL_ENCODER_SUBFOLDER, MODEL_FILES, RUN_RECORD_FILES, UsageError
from ..checkpoint.image_index_files import index_file_names

logger = logging.getLogger(__name__)

# what an earlier run left that a new one must not inherit (weights and code are rewritten by the new run)
RUN_RESULTS = RUN_RECORD_FILES
RUN_SUBDIRS = (DUAL_ENCODER_SUBFOLDER,)  # --dense_first's dual encoder: a new run trains its own
MODEL_STATE = MODEL_FILES


def check_output_dir(output_dir: str, overwrite: bool, resuming: bool, dense_first: bool = False) -> None:
    """Refuse a non-empty `output_dir` unless `resuming` or `overwrite` (call it on every process). With
    `dense_first`, a directory holding only the dense stage is the same run continuing (that stage is reused or
    resumed)."""
    if resuming or overwrite or not os.path.isdir(output_dir):
        return
    entries = sorted(set(os.listdir(output_dir)) - (set(RUN_SUBDIRS) if dense_first else set()))
    if entries:
        shown = ", ".join(entries[:5]) + (" ..." if len(entries) > 5 else "")
        raise UsageError(f"--output_dir {output_dir} is not empty ({shown}). Pass --overwrite_output_dir to replace "
                         "that run, --resume_from_checkpoint to continue it, or another --output_dir.")


def clear_previous_run(output_dir: str, keep_model: bool = False) -> list[str]:
    """Remove an earlier run's results and checkpoints (and its model files unless `keep_model`, as when an
    evaluate-only run writes beside the checkpoint it evaluates). Returns what was removed. Main process only."""
    if not os.path.isdir(output_dir):
        return []
    names = list(RUN_RESULTS) + ([] if keep_model else list(MODEL_STATE) + index_file_names(output_dir))
    removed = [path for path in (os.path.join(output_dir, n) for n in dict.fromkeys(names)) if os.path.isfile(path)]
    for path in removed:
        os.unlink(path)
    checkpoints = sorted(glob.glob(os.path.join(output_dir, "checkpoint-*")))
    if not keep_model:
        checkpoints += [path for path in (os.path.join(output_dir, d) for d in RUN_SUBDIRS) if os.path.isdir(path)]
    for path in checkpoints:
        shutil.rmtree(path)
    removed += checkpoints
    if removed:
        logger.info("--overwrite_output_dir: removed %d files/checkpoints of the previous run in %s", len(removed),
                    output_dir)
    return removed


__all__ = ["check_output_dir", "clear_previous_run", "RUN_RESULTS", "MODEL_STATE", "RUN_SUBDIRS"]
