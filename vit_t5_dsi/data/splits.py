"""The DSI protocol over an image collection (after DSI and the seed): what is indexed, trained and evaluated.

- every selected image is indexed (image -> id), held-out ones included;
- captions of training images are retrieval-training queries (caption -> id);
- captions of held-out images are the evaluation queries ("unseen": their only signal was indexing);
- optionally m captions per training image are held out as "seen" evaluation queries.
Flickr30K's reference protocol: `num_index_images=10000, num_eval_images=2000` (captions of 8,000 trained on).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass

import datasets
import numpy as np

from .collection import ImageCollection
from ..checkpoint.checkpoint_io import CollectionError

logger = logging.getLogger(__name__)


@dataclass
class DSISplits:
    index: datasets.Dataset  # image_key, image
    train_queries: datasets.Dataset  # image_key, caption
    eval_queries: datasets.Dataset  # captions of held-out images
    seen_queries: datasets.Dataset  # held-out captions of training images

    def summary(self) -> str:
        return (f"{len(self.index)} images indexed, {len(self.train_queries)} training captions, "
                f"{len(self.eval_queries)} held-out-image queries, {len(self.seen_queries)} seen-image queries")

    def sampled(self, max_train_queries: int | None, max_eval_queries: int | None, seed: int) -> "DSISplits":
        """These splits with at most `max_train_queries` training captions and `max_eval_queries` held-out and
        seen queries each (a seeded sample; None keeps all). The indexed images stay all of them."""
        train = sample_rows(self.train_queries, max_train_queries, seed) if max_train_queries else self.train_queries
        held, seen = ((sample_rows(rows, max_eval_queries, seed) for rows in (self.eval_queries, self.seen_queries))
                      if max_eval_queries else (self.eval_queries, self.seen_queries))
        return DSISplits(self.index, train, held, seen)

    def held_out_captions(self) -> dict[str, list[str]]:
        """Held-out image key -> its real captions: the references of caption-quality metrics (never trained on)."""
        return _captions_by_image(self.eval_queries)

    def training_captions(self) -> dict[str, list[str]]:
        """Training image key -> its training captions (what the pseudo-query filter checks copies against)."""
        return _captions_by_image(self.train_queries)


def _captions_by_image(rows: datasets.Dataset) -> dict[str, list[str]]:
    captions: dict[str, list[str]] = {}
    for key, caption in zip(rows["image_key"][:], rows["caption"][:]):
        captions.setdefault(key, []).append(caption)
    return captions


def sample_rows(rows: datasets.Dataset, count: int, seed: int) -> datasets.Dataset:
    """`count` rows of `rows` chosen by `seed` (the same ones every time), in their original order."""
    if count >= len(rows):
        return rows
    chosen = np.sort(np.random.default_rng(seed).choice(len(rows), count, replace=False))
    return rows.select(chosen.tolist())


def _captions(keys, captions) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"image_key": list(keys), "caption": list(captions)})


def build_dsi_splits(collection: ImageCollection, num_index_images: int | None = None,
                     num_eval_images: int | None = None, seen_captions_per_image: int = 0,
                     heldout_splits: tuple[str, ...] = ("test", "val"), seed: int = 42) -> DSISplits:
    """Deterministic under `seed`. Images whose split is in `heldout_splits` (Karpathy test/val) are the
    held-out candidates; without any, `num_eval_images` are drawn from the whole collection."""
    rng = np.random.default_rng(seed)
    keys = collection.images["image_key"][:]
    splits = collection.images["split"][:]
    heldout_candidates = [i for i, s in enumerate(splits) if s in heldout_splits]
    if not heldout_candidates and num_eval_images:
        heldout_candidates = list(range(len(keys)))
    if num_eval_images is not None:
        if num_eval_images > len(heldout_candidates):
            raise CollectionError(f"num_eval_images={num_eval_images}: {collection.source} has only "
                                  f"{len(heldout_candidates)} held-out candidate images (splits {heldout_splits}).")
        heldout = sorted(rng.choice(heldout_candidates, size=num_eval_images, replace=False).tolist())
    else:
        heldout = heldout_candidates
    heldout_set = set(heldout)
    train_candidates = [i for i in range(len(keys)) if i not in heldout_set]
    if num_index_images is not None:
        wanted = num_index_images - len(heldout)
        if wanted < 0 or wanted > len(train_candidates):
            raise CollectionError(
                f"num_index_images={num_index_images}: needs {wanted} training images besides the {len(heldout)} "
                f"held-out ones, and {collection.source} has {len(train_candidates)}.")
        train = sorted(rng.choice(train_candidates, size=wanted, replace=False).tolist())
    else:
        train = train_candidates
    selected = sorted(heldout_set | set(train))
    index = collection.images.select(selected).remove_columns("split")

    by_key, reserved = defaultdict(list), defaultdict(list)  # reserved: captions the data marks evaluation-only
    evaluation_only = (collection.captions["evaluation_only"][:] if "evaluation_only" in collection.captions.column_names
                       else [False] * len(collection.captions))
    for key, caption, only_eval in zip(collection.captions["image_key"][:], collection.captions["caption"][:],
                                       evaluation_only):
        (reserved if only_eval else by_key)[key].append(caption)
    train_pairs, seen_pairs, eval_pairs = [], [], []
    for i in train:
        captions = by_key.get(keys[i], [])
        held = min(seen_captions_per_image, max(len(captions) - 1, 0))
        chosen = set(rng.choice(len(captions), size=held, replace=False).tolist()) if held else set()
        for j, caption in enumerate(captions):
            (seen_pairs if j in chosen else train_pairs).append((keys[i], caption))
        seen_pairs.extend((keys[i], caption) for caption in reserved.get(keys[i], []))
    for i in heldout:
        eval_pairs.extend((keys[i], caption) for caption in by_key.get(keys[i], []) + reserved.get(keys[i], []))
    if heldout and not eval_pairs:
        logger.warning("The %d held-out images have no captions: there are no evaluation queries.", len(heldout))
    result = DSISplits(index, *(_captions([k for k, _ in pairs], [c for _, c in pairs])
                                for pairs in (train_pairs, eval_pairs, seen_pairs)))
    logger.info("DSI splits: %s", result.summary())
    return result


__all__ = ["DSISplits", "build_dsi_splits"]
