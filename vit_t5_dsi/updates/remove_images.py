"""`remove_images`: images taken out of a trained checkpoint, so that no search can return them again.

The removed ids leave the trie (beam search cannot write them), their embeddings leave the dual encoder's index,
their stored pseudo-queries go, and the ids are retired: never given to an image added later, since the weights
still associate them with the removed image. No training is needed.
"""

from __future__ import annotations

import logging
import os
import time

from ..checkpoint.checkpoint_io import UsageError
from .checkpoint_update import check_output_dir, load_checkpoint, write_checkpoint
from ..training.pseudo_queries import PseudoQueries

logger = logging.getLogger(__name__)


def read_keys(keys) -> list[str]:
    """Keys as a list, or a text file with one key per line."""
    if isinstance(keys, (str, os.PathLike)):
        path = os.fspath(keys)
        if not os.path.isfile(path):
            raise UsageError(f"{path}: no such file of keys to remove (one key per line).")
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    return [str(k) for k in keys]


def remove_images(checkpoint: str, keys, *, output_dir: str | None = None, overwrite_output_dir: bool = False,
                  dual_encoder: str | None = None) -> dict:
    """Remove `keys` (a list, or a file with one key per line) from the checkpoint in `checkpoint` and write the
    result to `output_dir` (in place only with `overwrite_output_dir=True`), atomically. An unknown key is an error
    naming it. Returns what the checkpoint's update log records."""
    start = time.perf_counter()
    target = check_output_dir(checkpoint, output_dir, overwrite_output_dir)
    keys = list(dict.fromkeys(read_keys(keys)))
    if not keys:
        raise UsageError("remove_images: no keys given.")
    ck = load_checkpoint(checkpoint, dual_encoder)
    index = ck.model.image_index
    unknown = [k for k, p in zip(keys, index.positions_of(keys)) if p < 0]
    if unknown:
        raise UsageError(f"{len(unknown)} of the keys to remove are not indexed in {checkpoint} (e.g. "
                         f"{unknown[:3]}).")
    if len(keys) >= len(index):
        raise UsageError(f"remove_images: removing all {len(index)} images would leave an empty index.")
    ck.model.image_index = index.without(keys)
    if ck.dual_encoder is not None and not ck.is_dual_encoder:
        dual = ck.dual_encoder.image_index
        present = [k for k, p in zip(keys, dual.positions_of(keys)) if p >= 0]
        ck.dual_encoder.image_index = dual.without(present) if present else dual
    if ck.pseudo_queries is not None:
        removed = set(keys)
        ck.pseudo_queries = PseudoQueries({k: v for k, v in ck.pseudo_queries.queries.items() if k not in removed},
                                          ck.pseudo_queries.source)
    record = {"action": "remove", "num_images": len(keys), "keys": keys[:5], "num_indexed": len(ck.model.image_index),
              "scheme": index.scheme, "seconds": round(time.perf_counter() - start, 1)}
    logger.info("Removed %d images; index: %d images.", len(keys), len(ck.model.image_index))
    write_checkpoint(ck, target, record)
    return record


__all__ = ["remove_images", "read_keys"]
