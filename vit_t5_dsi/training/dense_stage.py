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

import torch


DENSE_FIRST_DIR = "dual_encoder"
# what a finished dense stage leaves (written by the final save, after its last checkpoint)
FINISHED_FILES = ("config.json", "model.safetensors", "image_index.json", "image_embeddings.safetensors",
                  "all_results.json")


def dense_stage_arguments(model_args, data_args, training_args):
    """The flags of the dense stage: the same data, seed, batch and schedule shape, the dual-encoder variant, its
    own output directory and budget (--dense_first_epochs, else a share of the generative one); no captioning or
    pseudo-queries (they belong to the generative model), no push (the generative run pushes)."""
    directory = os.path.join(training_args.output_dir, DENSE_FIRST_DIR)
    from .recipe import DENSE_FIRST_SHARE

    model = dataclasses.replace(model_args, variant="dual_encoder", dense_first=False, dense_first_epochs=None,
                                rerank_with=None, semantic_embeddings=None, model_name_or_path=None,
                                start_from_dense=False)
    data = dataclasses.replace(data_args, captioning_ratio=0.0, pseudo_queries=None, pseudo_query_epochs=None,
                               pseudo_query_at=None, pseudo_query_filter_top_k=0)
    # the dense stage's budget follows the generative one (a share of its epochs or of its --max_steps)
    if model_args.dense_first_epochs is not None:
        epochs, max_steps = model_args.dense_first_epochs, -1
    else:
        epochs = DENSE_FIRST_SHARE * training_args.num_train_epochs
        max_steps = max(1, round(DENSE_FIRST_SHARE * training_args.max_steps)) if training_args.max_steps > 0 else -1
    training = dataclasses.replace(
        training_args, output_dir=directory, resume_from_checkpoint=last_checkpoint(directory),
        num_train_epochs=epochs, max_steps=max_steps, push_to_hub=False,
        overwrite_output_dir=False, do_train=True, do_eval=True,
        run_name=f"{training_args.run_name or os.path.basename(os.path.abspath(training_args.output_dir))}-dense")
    return model, data, training


def start_from_dense(model, dual_encoder) -> int:
    """Copy the trained dual encoder's image tower, T5 encoder and token embeddings into a new generative model;
    returns the number of tensors copied.

    The ids are codes of the dual encoder's image space, so a generative model that starts from the same encoders
    only has to learn to write the codes of where an image or a caption lies in that space (GENIUS builds its
    decoder on CLIP's encoders the same way). Token embedding rows are copied for the vocabulary both share (the
    generative model adds id and caption tokens after it). Tensors whose shapes differ are left as they are.
    """
    pairs = [(model.vision_model, dual_encoder.vision_model),
             (model.language_model.encoder, dual_encoder.text_model.encoder)]
    copied = 0
    with torch.no_grad():
        for target, source in pairs:
            own = target.state_dict()
            for name, tensor in source.state_dict().items():
                if name in own and own[name].shape == tensor.shape:
                    own[name].copy_(tensor)
                    copied += 1
        rows = dual_encoder.get_input_embeddings().weight
        embeddings = model.get_input_embeddings().weight
        shared = min(len(rows), len(embeddings))
        embeddings[:shared].copy_(rows[:shared])
    return copied + 1


def finished_dense_model(directory: str) -> bool:
    return all(os.path.isfile(os.path.join(directory, name)) for name in FINISHED_FILES)


def last_checkpoint(directory: str) -> str | None:
    """The latest complete `checkpoint-N` of an interrupted dense stage (it resumes from there), or None; a
    folder the run was killed while writing is skipped."""
    from .trainer import checkpoint_is_complete

    complete = [path for path in glob.glob(os.path.join(directory, "checkpoint-*"))
                if os.path.basename(path).split("-")[-1].isdigit() and checkpoint_is_complete(path)]
    return max(complete, key=lambda path: int(path.rsplit("-", 1)[-1])) if complete else None


def remove_checkpoints(directory: str) -> None:
    """A finished dense stage's `checkpoint-N` folders only resumed it (and would be pushed with the model)."""
    for checkpoint in glob.glob(os.path.join(directory, "checkpoint-*")):
        shutil.rmtree(checkpoint)


__all__ = ["DENSE_FIRST_DIR", "dense_stage_arguments", "start_from_dense", "finished_dense_model", "last_checkpoint",
           "remove_checkpoints"]
