"""The dense-then-generative recipe (`--dense_first`): a dual encoder trained first on the same data gives the
image embeddings the generative model's ids are built from (GENIUS builds its ids from contrastive embeddings),
and the same dual encoder can then re-rank the generative beam.

The dense stage is a complete run of its own in OUTPUT_DIR/dual_encoder (checkpoint, metrics, model card), so it
can be loaded, evaluated and pushed like any other; this module decides its arguments and whether it is done.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import shutil

from transformers.trainer_utils import get_last_checkpoint

DENSE_FIRST_DIR = "dual_encoder"
# what a finished dense stage leaves (written by the final save, after its last checkpoint)
FINISHED_FILES = ("config.json", "model.safetensors", "image_index.json", "image_embeddings.safetensors",
                  "all_results.json")


def dense_stage_arguments(model_args, data_args, training_args):
    """The flags of the dense stage: the same data, seed, batch and schedule shape, the dual-encoder variant, its
    own output directory and epochs; no captioning or pseudo-queries (they belong to the generative model), no
    push (the generative run pushes)."""
    directory = os.path.join(training_args.output_dir, DENSE_FIRST_DIR)
    model = dataclasses.replace(model_args, variant="dual_encoder", dense_first=False, dense_first_epochs=None,
                                rerank_with=None, semantic_embeddings=None, model_name_or_path=None)
    data = dataclasses.replace(data_args, captioning_ratio=0.0, pseudo_queries=None, pseudo_query_epochs=None)
    training = dataclasses.replace(
        training_args, output_dir=directory, resume_from_checkpoint=last_checkpoint(directory),
        num_train_epochs=model_args.dense_first_epochs or training_args.num_train_epochs, push_to_hub=False,
        overwrite_output_dir=False, do_train=True, do_eval=True,
        run_name=f"{training_args.run_name or os.path.basename(os.path.abspath(training_args.output_dir))}-dense")
    return model, data, training


def finished_dense_model(directory: str) -> bool:
    return all(os.path.isfile(os.path.join(directory, name)) for name in FINISHED_FILES)


def last_checkpoint(directory: str) -> str | None:
    """The latest `checkpoint-N` of an interrupted dense stage (it resumes from there), or None."""
    return get_last_checkpoint(directory) if os.path.isdir(directory) else None


def remove_checkpoints(directory: str) -> None:
    """A finished dense stage's `checkpoint-N` folders only resumed it (and would be pushed with the model)."""
    for checkpoint in glob.glob(os.path.join(directory, "checkpoint-*")):
        shutil.rmtree(checkpoint)


__all__ = ["DENSE_FIRST_DIR", "dense_stage_arguments", "finished_dense_model", "last_checkpoint",
           "remove_checkpoints"]
