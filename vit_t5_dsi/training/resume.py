"""`--resume_from_checkpoint latest`: the one command that resumes a run stopped at any moment (killed by a
scheduler or the OOM killer, or by `fault_points` in the tests)."""

from __future__ import annotations

import glob
import logging
import os
import shutil

logger = logging.getLogger(__name__)

LATEST = "latest"

# The last file DSITrainer writes into a checkpoint: its presence marks the checkpoint complete.
RESUME_STATE_FILE = "dsi_trainer_state.json"


def checkpoint_is_complete(folder: str) -> bool:
    """A checkpoint DSITrainer finished writing (its last file is `dsi_trainer_state.json`)."""
    return os.path.isfile(os.path.join(folder, RESUME_STATE_FILE))


class CheckpointMismatchError(RuntimeError):
    """A checkpoint's weights do not fit the model being resumed (missing, unexpected or mis-shaped tensors)."""


def load_checkpoint_weights(model, checkpoint: str) -> None:
    """Load `checkpoint`'s weights into `model` exactly as `from_pretrained` reads them, or raise.

    Trainer's own resume reads `model.safetensors` with `load_state_dict(strict=False)` and none of the key
    conversion transformers 5 applies in `from_pretrained` (a ViT saved under its legacy names
    `encoder.layer.N.attention.attention.query` then matches none of `layers.N.attention.q_proj`), and only warns:
    a resumed run trained on with a randomly initialised image tower. Here the checkpoint is loaded through
    `from_pretrained` (every conversion applied), and its state dict must match the model's key for key.
    """
    from ..checkpoint.loading import load_dsi_model

    try:
        loaded = load_dsi_model(checkpoint, strict=True)
    except (OSError, ValueError) as err:
        raise CheckpointMismatchError(f"{checkpoint}: cannot load its weights ({err}).") from err
    if loaded.config.variant != model.config.variant:
        raise CheckpointMismatchError(f"{checkpoint}: a {loaded.config.variant} checkpoint cannot resume a "
                                      f"{model.config.variant} model.")
    state = loaded.state_dict()
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    mis_shaped = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or mis_shaped:
        raise CheckpointMismatchError(
            f"{checkpoint}: its weights do not fit the model being resumed ({len(missing)} missing, e.g. "
            f"{missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]}; {len(mis_shaped)} of another "
            f"shape, e.g. {mis_shaped[:3]}). Resume with the flags and data the checkpoint was trained with.")
    model.load_state_dict(state, strict=True)


def last_checkpoint(directory: str) -> str | None:
    """The latest complete `checkpoint-N` of `directory` (a run, or an interrupted dense stage, resumes from
    there), or None; a folder the run was killed while writing is skipped."""
    complete = [path for path in glob.glob(os.path.join(directory, "checkpoint-*"))
                if os.path.basename(path).split("-")[-1].isdigit() and checkpoint_is_complete(path)]
    return max(complete, key=lambda path: int(path.rsplit("-", 1)[-1])) if complete else None


def resolve_latest_checkpoint(training_args) -> None:
    """`--resume_from_checkpoint latest`: the last complete `checkpoint-N` in --output_dir (one a run was killed
    while writing is skipped), or, when there is none, no checkpoint: the run then starts as the same command
    without the flag would (a --dense_first stage resumes or is reused; any other non-empty --output_dir is
    refused). The one command that resumes a run stopped at any moment."""
    if str(training_args.resume_from_checkpoint or "").lower() != LATEST:
        return
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


__all__ = ["LATEST", "RESUME_STATE_FILE", "CheckpointMismatchError", "checkpoint_is_complete",
           "load_checkpoint_weights", "last_checkpoint", "resolve_latest_checkpoint", "remove_unfinished_start"]
