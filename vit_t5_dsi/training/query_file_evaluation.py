"""Evaluate a trained checkpoint on a file of new queries, without its collection.

    python run_dsi_image.py --model_name_or_path CKPT --do_train False --validation_file queries.jsonl \\
        --output_dir eval_queries

The checkpoint knows its images (its index, and for a dual encoder their stored embeddings), so ranking caption
queries needs neither the image files nor the collection's flags. The queries are ranked exactly as after
training (the same trainer, metrics and distributed evaluation), re-ranked by the checkpoint's own
`dual_encoder/` when it carries one (as every search surface does; `--rerank_with none` turns it off), and the
figures land where a training run's do: `eval_results.json`, `all_results.json`, `eval_predictions.jsonl`.
"""

from __future__ import annotations

import logging

from ..checkpoint.checkpoint_io import UsageError
from ..checkpoint.loading import load_dsi_model, resolve_reranker
from ..checkpoint.processing_vit_t5_dsi import ViTT5DSIProcessor
from ..data.query_file import load_query_file
from .recipe import OWN_DUAL_ENCODER
from .run_steps import train_and_evaluate
from .trainer import DSITrainer

logger = logging.getLogger("run_dsi_image")


def evaluate_query_file(model_args, data_args, training_args) -> dict[str, float]:
    """Every query of `--validation_file` against `--model_name_or_path`'s index; returns the metrics."""
    checkpoint = model_args.model_name_or_path
    try:
        model = load_dsi_model(checkpoint)
        processor = ViTT5DSIProcessor.from_pretrained(checkpoint)
    except (OSError, ValueError) as err:
        raise UsageError(f"--model_name_or_path {checkpoint}: cannot load it ({err}).") from err
    if model.image_index is None:
        raise UsageError(f"--model_name_or_path {checkpoint}: the checkpoint has no image index to evaluate.")
    queries = load_query_file(data_args.validation_file, model.image_index)
    logger.info("Evaluating %d queries of %s against the %d images %s indexes.", len(queries),
                data_args.validation_file, len(model.image_index), checkpoint)
    rerank_with = model_args.rerank_with
    try:
        reranker = resolve_reranker(checkpoint, model.config, rerank=False if rerank_with is None else None,
                                    rerank_with=None if rerank_with in (None, OWN_DUAL_ENCODER) else rerank_with,
                                    rerank_weight=model_args.rerank_weight)
    except (OSError, ValueError) as err:
        raise UsageError(f"--rerank_with {rerank_with}: {err}") from err
    if training_args.retrieval_k > len(model.image_index):
        raise UsageError(f"--retrieval_k {training_args.retrieval_k} is larger than the {len(model.image_index)} "
                         "indexed images.")
    processor.max_caption_length = data_args.max_caption_length
    trainer = DSITrainer(model=model, args=training_args, images=None, processing_class=processor,
                         eval_dataset={"eval": queries}, reranker=reranker)
    return train_and_evaluate(trainer, training_args)


__all__ = ["evaluate_query_file"]
