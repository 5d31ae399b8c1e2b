"""What a run leaves beside its model so that its figures can be read and reproduced: `protocol.json` (the
collection, the splits' sizes, the recipe as it ran), the pseudo-queries it trained on, and the model card."""

from __future__ import annotations

import json
import os

from ..checkpoint.checkpoint_io import PROTOCOL_FILE, PSEUDO_QUERIES_FILE, atomic_write_text
from ..checkpoint.image_index import EMBEDDING_SCHEMES
from .recipe import pseudo_query_fractions


def protocol(*, collection, splits, model, model_args, data_args, dense_dir: str | None, rows_per_epoch: int,
             pseudo_query_rows: int, pseudo_queries, refresh) -> dict:
    """The run's protocol as JSON-able data (see docs/protocol.md)."""
    index = model.image_index
    return {
        "source": collection.source, "num_indexed": len(splits.index),
        "num_train_queries": len(splits.train_queries), "num_eval_queries": len(splits.eval_queries),
        "num_seen_queries": len(splits.seen_queries), "variant": model.config.variant,
        "docid_scheme": index.scheme, "docid_scheme_info": index.scheme_info,
        "id_embeddings": ("dense_first: " + dense_dir if dense_dir else model_args.semantic_embeddings or
                          "the model's image tower") if index.scheme in EMBEDDING_SCHEMES else None,
        "rerank_with": ({"model": dense_dir if model_args.rerank_with == "dense_first" else model_args.rerank_with,
                         "weight": model_args.rerank_weight} if model_args.rerank_with else None),
        "captioning_rows_per_epoch": (round(data_args.captioning_ratio * len(splits.train_queries))
                                      if model.config.is_generative else 0),
        "rows_per_epoch": rows_per_epoch,
        "pseudo_query_rows_per_epoch": pseudo_query_rows,
        "pseudo_queries": {**pseudo_queries.summary(), "images": data_args.pseudo_query_images,
                           "epochs": refresh.epochs if refresh is not None else [],
                           "at_fractions": pseudo_query_fractions(data_args),
                           "filter_top_k": data_args.pseudo_query_filter_top_k or 0},
    }


def write_run_record(trainer, training_args, description: str, dataset_tags, record: dict, pseudo_queries) -> None:
    """Card (for a model this run trained), protocol.json and the pseudo-queries, on the main process; then the
    push, when asked (every process takes part)."""
    if trainer.is_world_process_zero():
        if training_args.do_train:  # the card describes the model saved in output_dir
            trainer.create_model_card(dataset=description, dataset_tags=dataset_tags)
        atomic_write_text(os.path.join(training_args.output_dir, PROTOCOL_FILE), json.dumps(record, indent=2))
        if pseudo_queries is not None and len(pseudo_queries):
            pseudo_queries.save(os.path.join(training_args.output_dir, PSEUDO_QUERIES_FILE))
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset=description, dataset_tags=dataset_tags)


__all__ = ["protocol", "write_run_record"]
