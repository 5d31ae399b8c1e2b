"""The dense-then-generative recipe (`--dense_first`): a dual encoder trained first on the same data gives the
image embeddings the generative model's ids are built from (GENIUS builds its ids from contrastive embeddings),
and the same dual encoder can then re-rank the generative beam.

The dense stage is a complete run of its own in OUTPUT_DIR/dual_encoder (checkpoint, metrics, model card), so it
can be loaded, evaluated and pushed like any other; this module decides its arguments and whether it is done.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import shutil
from functools import cached_property

import torch
from accelerate import PartialState

from ..checkpoint.configuration_vit_t5_dsi import DUAL_ENCODER
from ..checkpoint.ranking import DenseReranker
from ..checkpoint.checkpoint_io import (ALL_RESULTS_FILE, CONFIG_FILE, DUAL_ENCODER_SUBFOLDER, EMBEDDINGS_FILE_NAME,
                                        INDEX_FILE_NAME, WEIGHTS_FILE, UsageError)
from ..checkpoint.loading import load_dense_reranker, load_dsi_model
from ..checkpoint.processing_vit_t5_dsi import ViTT5DSIProcessor
from ..data.rows import ImageSource, evaluation_sets, training_stream
from .pseudo_queries import PseudoQueries
from .recipe import DENSE_FIRST_SHARE
from .run_identifiers import attach_index, identifiers_for
from .run_record import protocol, write_run_record
from .run_steps import build_model_and_processor, collection_description, train_and_evaluate
from .resume import last_checkpoint
from .trainer import DSITrainer

logger = logging.getLogger("run_dsi_image")

DENSE_FIRST_DIR = DUAL_ENCODER_SUBFOLDER
# what a finished dense stage leaves (written by the final save, after its last checkpoint)
FINISHED_FILES = (CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE_NAME, EMBEDDINGS_FILE_NAME, ALL_RESULTS_FILE)
# the dense stage's figures that travel to the generative run's results, prefixed dense_
REPORTED_PREFIXES = ("eval", "seen", "index", "train")


@dataclasses.dataclass
class DenseStage:
    """A finished dense stage: where its dual encoder lies and its figures (prefixed dense_)."""

    directory: str
    metrics: dict[str, float]

    @cached_property
    def model(self):
        """The trained dual encoder, loaded once: the towers the generative model starts from, its re-ranker and
        its pseudo-query filter."""
        return load_dsi_model(self.directory)


def train_dense_stage(model_args, data_args, training_args, collection, splits) -> DenseStage:
    """--dense_first: the dual encoder's run in OUTPUT_DIR/dual_encoder, a complete run of its own (model, index,
    embeddings, results, card), reused when finished and resumed from its last checkpoint when interrupted."""
    d_model_args, d_data_args, d_training_args = dense_stage_arguments(model_args, data_args, training_args)
    directory = d_training_args.output_dir
    if finished_dense_model(directory):
        logger.info("--dense_first: reusing the dual encoder already trained in %s.", directory)
        with open(os.path.join(directory, ALL_RESULTS_FILE), encoding="utf-8") as f:
            metrics = json.load(f)
    else:
        logger.info("--dense_first: training the dual encoder for %g epochs in %s%s.",
                    d_training_args.num_train_epochs, directory,
                    f" (resuming from {d_training_args.resume_from_checkpoint})"
                    if d_training_args.resume_from_checkpoint else "")
        metrics = _train_dual_encoder(d_model_args, d_data_args, d_training_args, collection, splits)
        finish_tracking_run(training_args)
        if training_args.process_index == 0:
            remove_checkpoints(directory)
    PartialState().wait_for_everyone()  # every process reads the finished dual encoder from here on
    return DenseStage(directory, {f"dense_{key}": value for key, value in metrics.items()
                                  if key.split("_", 1)[0] in REPORTED_PREFIXES})


def _train_dual_encoder(model_args, data_args, training_args, collection, splits) -> dict[str, float]:
    """The same steps as the generative run, for a dual encoder: model, naive index, train, evaluate, record."""
    model, processor = build_model_and_processor(model_args, data_args, training_args, splits,
                                                 training_args.resume_from_checkpoint)
    images = ImageSource(splits.index)
    index = identifiers_for(model_args, training_args, model, processor, splits, images)
    attach_index(model, processor, index, images, model_args, training_args)
    train_dataset = (training_stream(splits, model.config.variant, data_args.indexing_ratio, training_args.seed)
                     if training_args.do_train else None)
    trainer = DSITrainer(model=model, args=training_args, images=images, processing_class=processor,
                         augment=data_args.augment, train_dataset=train_dataset,
                         eval_dataset=evaluation_sets(splits, data_args.max_index_eval_images),
                         image_cache_mb=data_args.image_cache_mb,
                         queries_during_training=data_args.eval_queries_during_training)
    metrics = train_and_evaluate(trainer, training_args)
    record = protocol(collection=collection, splits=splits, model=model, model_args=model_args, data_args=data_args,
                      dense_dir=None, rows_per_epoch=len(train_dataset) if train_dataset is not None else 0,
                      pseudo_query_rows=0, pseudo_queries=PseudoQueries(), refresh=None)
    write_run_record(trainer, training_args, collection_description(data_args, collection, splits),
                     data_args.dataset_name, record, None)
    return metrics


def finish_tracking_run(training_args) -> None:
    """Close the dense stage's wandb run, so the generative model's curves start a run of their own."""
    if "wandb" in (training_args.report_to or []) and training_args.process_index == 0:
        import wandb

        if wandb.run is not None:
            wandb.finish()


def dense_reranker(model_args, data_args, index, dense: DenseStage | None) -> DenseReranker | None:
    """The dual encoder that re-ranks the beam (--rerank_with) and filters pseudo-queries
    (--pseudo_query_filter_top_k): the one --rerank_with names, else the dense stage's. None when neither needs
    one, and for the dual encoder itself, which ranks on its own."""
    needed = model_args.rerank_with is not None or data_args.pseudo_query_filter_top_k
    if model_args.variant == DUAL_ENCODER or not needed:
        return None
    try:
        if model_args.rerank_with in (None, "dense_first") and dense is not None:
            reranker = DenseReranker(dense.model, ViTT5DSIProcessor.from_pretrained(dense.directory),
                                     model_args.rerank_weight)
        else:
            reranker = load_dense_reranker(model_args.rerank_with, model_args.rerank_weight)
        reranker.embeddings_for(index)
    except (OSError, ValueError) as err:
        raise UsageError(f"--rerank_with {model_args.rerank_with or 'dense_first'}: {err}") from err
    return reranker


def dense_stage_arguments(model_args, data_args, training_args):
    """The flags of the dense stage: the same data, seed, batch and schedule shape, the dual-encoder variant, its
    own output directory and budget (--dense_first_epochs, else a share of the generative one); no captioning or
    pseudo-queries (they belong to the generative model), no push (the generative run pushes)."""
    directory = os.path.join(training_args.output_dir, DENSE_FIRST_DIR)

    model = dataclasses.replace(model_args, variant=DUAL_ENCODER, dense_first=False, dense_first_epochs=None,
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


def remove_checkpoints(directory: str) -> None:
    """A finished dense stage's `checkpoint-N` folders only resumed it (and would be pushed with the model)."""
    for checkpoint in glob.glob(os.path.join(directory, "checkpoint-*")):
        shutil.rmtree(checkpoint)


__all__ = ["DENSE_FIRST_DIR", "DenseStage", "train_dense_stage", "dense_reranker", "dense_stage_arguments", "start_from_dense", "finished_dense_model",
           "remove_checkpoints"]
