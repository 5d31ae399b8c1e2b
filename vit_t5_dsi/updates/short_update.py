"""The short update that teaches a trained model its new ids, in DSI++'s spirit (Mehta et al., EMNLP 2023).

Rows of the update (one `DSITrainer` run of `steps` optimizer steps, no hand loop):
- new images: an indexing row each (image -> new id) and pseudo-query rows: captions the model's own caption
  decoder writes for them, kept when the dual encoder finds their image (the recipe's round-trip filter);
- replay, so that the old images are not forgotten: indexing rows of old images, their real training captions
  (given by the caller: the checkpoint does not store them) and the pseudo-queries the checkpoint stored, sampled
  to `replay_ratio` old rows per new row (a bounded cost however large the collection).
A new image's real captions never reach a row: they are not even read (`load_new_images`).
"""

from __future__ import annotations

import logging
import tempfile
import time

import datasets
import numpy as np
import torch

from ..checkpoint.ranking import DenseReranker
from ..data.rows import INDEXING, PSEUDO_QUERY, RETRIEVAL, ImageSource
from ..training.arguments import DSITrainingArguments
from ..training.pseudo_queries import PseudoQueries, RoundTripFilter, generate_pseudo_queries
from ..training.trainer import DSITrainer

logger = logging.getLogger(__name__)

PSEUDO_QUERIES_PER_IMAGE = 10  # written per new image, and rows per new image per pass (the recipe's numbers)
FILTER_TOP_K = 1  # the recipe's round-trip filter


def _rows(keys, captions, kinds, slots, evaluate=False) -> datasets.Dataset:
    """Rows as the collator reads them (`vit_t5_dsi.data.rows`)."""
    return datasets.Dataset.from_dict({"image_key": list(keys), "caption": list(captions), "kind": list(kinds),
                                       "evaluate": [evaluate] * len(keys), "query_id": list(range(len(keys))),
                                       "slot": list(slots)})


def write_pseudo_queries(checkpoint, keys: list[str], images: ImageSource, seed: int, batch_size: int = 32,
                         num_queries: int = PSEUDO_QUERIES_PER_IMAGE, filter_top_k: int = FILTER_TOP_K
                         ) -> PseudoQueries:
    """The model's own captions of the new images (sampled as in training, seeded), round-trip filtered."""
    model = checkpoint.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        queries = generate_pseudo_queries(model, keys, images, checkpoint.processor, num_queries,
                                          batch_size, model.device, distributed=False)
    if checkpoint.dual_encoder is not None and filter_top_k:
        reranker = DenseReranker(checkpoint.dual_encoder, checkpoint.dual_processor)
        queries = RoundTripFilter(reranker, model.image_index, filter_top_k)(queries)
    return PseudoQueries(queries, source="the model's own caption decoder, when the images were added")


def update_rows(checkpoint, new_keys: list[str], old_keys_with_files: list[str], replay: dict[str, list[str]],
                replay_ratio: float, seed: int, rows_per_image: int = PSEUDO_QUERIES_PER_IMAGE) -> datasets.Dataset:
    new = ([(k, "", INDEXING, 0) for k in new_keys]
           + [(k, "", PSEUDO_QUERY, j) for k in new_keys for j in range(rows_per_image)])
    new_set = set(new_keys)
    stored = checkpoint.pseudo_queries
    old = ([(k, "", INDEXING, 0) for k in old_keys_with_files]
           + [(k, c, RETRIEVAL, 0) for k, texts in replay.items() for c in texts]
           + ([(k, "", PSEUDO_QUERY, j) for k, texts in stored.queries.items() if k not in new_set
               for j in range(len(texts))] if stored is not None else []))
    rng = np.random.default_rng(seed)
    budget = int(round(replay_ratio * len(new)))
    if len(old) > budget:
        old = [old[i] for i in sorted(rng.choice(len(old), size=budget, replace=False).tolist())]
    rows = new + old
    return _rows(*zip(*rows)).shuffle(seed=seed) if rows else _rows([], [], [], [])


def short_update(checkpoint, new_keys: list[str], images: ImageSource, steps: int, replay: dict[str, list[str]],
                 learning_rate: float = 5e-4, batch_size: int = 64, replay_ratio: float = 2.0, seed: int = 42,
                 image_cache_mb: float = 1024, num_pseudo_queries: int = PSEUDO_QUERIES_PER_IMAGE,
                 pseudo_query_filter_top_k: int = FILTER_TOP_K, lr_scheduler_type: str = "linear",
                 pseudo_query_rows_per_image: int = PSEUDO_QUERIES_PER_IMAGE) -> dict:
    """Write pseudo-queries for `new_keys` and train `steps` steps on new and replayed rows. Returns what the
    update log records (rows, pseudo-queries, seconds)."""
    start = time.perf_counter()
    model = checkpoint.model
    captions = getattr(model.config, "caption_token_id", None) is not None
    written = (write_pseudo_queries(checkpoint, new_keys, images, seed, num_queries=num_pseudo_queries,
                                    filter_top_k=pseudo_query_filter_top_k) if captions else PseudoQueries())
    if not captions:
        logger.warning("This checkpoint does not caption: the new images are learnt from their pixels only.")
    store = PseudoQueries({**(checkpoint.pseudo_queries.queries if checkpoint.pseudo_queries is not None else {}),
                           **written.queries}, source="training and the update")
    checkpoint.pseudo_queries = store
    pseudo_seconds = time.perf_counter() - start
    old_with_files = [k for k in images.position if k not in set(new_keys)]
    rows = update_rows(checkpoint, new_keys, old_with_files, replay, replay_ratio, seed, pseudo_query_rows_per_image)
    with tempfile.TemporaryDirectory(prefix="vit_t5_dsi_update_") as scratch:
        args = DSITrainingArguments(output_dir=scratch, max_steps=steps, num_train_epochs=1, learning_rate=learning_rate,
                                    lr_scheduler_type=lr_scheduler_type, warmup_steps=min(10, steps // 5),
                                    per_device_train_batch_size=batch_size, save_strategy="no", report_to="none",
                                    logging_steps=max(1, steps // 5), disable_tqdm=True, seed=seed, do_eval=False,
                                    eval_strategy="no", dataloader_pin_memory=False, dataloader_num_workers=0)
        trainer = DSITrainer(model=model, args=args, images=images, processing_class=checkpoint.processor,
                             train_dataset=rows, pseudo_queries=store, image_cache_mb=image_cache_mb)
        trainer.train()
    model.eval()
    checkpoint.weights_changed = True
    kinds = np.asarray(rows["kind"])
    return {"update_steps": steps, "update_rows": len(rows), "new_rows": int(np.isin(rows["image_key"], new_keys).sum()),
            "replayed_caption_rows": int((kinds == RETRIEVAL).sum()), "pseudo_queries_written":
            sum(len(v) for v in written.queries.values()), "pseudo_query_seconds": round(pseudo_seconds, 1),
            "update_seconds": round(time.perf_counter() - start, 1), "learning_rate": learning_rate,
            "replay_ratio": replay_ratio, "pseudo_query_filter_top_k": pseudo_query_filter_top_k}


def index_hits(checkpoint, keys: list[str], images: ImageSource, prefix: str) -> dict[str, float]:
    """Image -> id Hits@1 of `keys` (indexing accuracy: needs no caption, so it may describe new images)."""
    if not keys:
        return {}
    with tempfile.TemporaryDirectory(prefix="vit_t5_dsi_update_eval_") as scratch:
        args = DSITrainingArguments(output_dir=scratch, report_to="none", disable_tqdm=True,
                                    per_device_eval_batch_size=64, dataloader_pin_memory=False,
                                    dataloader_num_workers=0, retrieval_k=min(10, len(checkpoint.model.image_index)))
        trainer = DSITrainer(model=checkpoint.model, args=args, images=images, processing_class=checkpoint.processor,
                             image_cache_mb=0)
        metrics = trainer.evaluate(_rows(keys, [""] * len(keys), [INDEXING] * len(keys), [0] * len(keys), True),
                                   metric_key_prefix=prefix)
    return {f"{prefix}_hits@1": float(metrics[f"{prefix}_hits@1"])}


__all__ = ["short_update", "write_pseudo_queries", "update_rows", "index_hits", "PSEUDO_QUERIES_PER_IMAGE"]
