"""The example streams the trainer reads and the collator that turns rows into model inputs.

Datasets hold only keys and captions; the collator opens, converts and resizes images and tokenizes captions.
It runs in DataLoader workers, so no image work happens in the training process and no model runs per sample.
"""

from __future__ import annotations

import hashlib

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm

from .image_cache import DecodedImages
from .splits import DSISplits
from ..checkpoint.configuration_vit_t5_dsi import DUAL_ENCODER
from ..checkpoint.image_index import ImageIndex
from ..checkpoint.processing_vit_t5_dsi import load_rgb

# `kind` of a row: image -> id, caption -> id, image -> caption (the caption decoder), and a pseudo-query slot
# (caption -> id, whose caption the collator takes from the current pseudo-queries of that image)
INDEXING, RETRIEVAL, CAPTIONING, PSEUDO_QUERY = 0, 1, 2, 3


class ImageSource:
    """Random access to the indexed images by key (the Arrow table is memory-mapped or small)."""

    def __init__(self, index_dataset: datasets.Dataset):
        self.dataset = index_dataset
        self.position = {key: i for i, key in enumerate(index_dataset["image_key"][:])}
        feature = index_dataset.features.get("image")
        # file paths (Karpathy, JSONL layouts) can change on disk; images held as bytes in the dataset cannot
        self._paths = index_dataset["image"][:] if getattr(feature, "dtype", None) == "string" else None

    def load(self, key: str):
        return load_rgb(self.dataset[self.position[key]]["image"])

    def path(self, key: str) -> str | None:
        """The image's file path, or None when the dataset holds the image itself."""
        return self._paths[self.position[key]] if self._paths is not None else None

    def batches(self, keys, processor, batch_size: int, desc: str | None = None):
        """Pixel tensors for `keys`, batch by batch, in order (with a progress bar when `desc` is given)."""
        starts = range(0, len(keys), batch_size)
        for start in tqdm(starts, desc=desc, disable=desc is None, mininterval=1.0):
            yield processor(images=[self.load(k) for k in keys[start:start + batch_size]])["pixel_values"]


def _rows(keys, captions, kind, evaluate, slots=None) -> datasets.Dataset:
    """`query_id` numbers evaluation rows so padding duplicates of distributed evaluation can be dropped."""
    return datasets.Dataset.from_dict({"image_key": list(keys), "caption": list(captions),
                                       "kind": [kind] * len(keys), "evaluate": [evaluate] * len(keys),
                                       "query_id": list(range(len(keys))),
                                       "slot": list(slots) if slots is not None else [0] * len(keys)})


def training_stream(splits: DSISplits, variant: str, indexing_ratio: float | None = None, seed: int = 42,
                    captioning_ratio: float = 0.0, pseudo_query_slots: dict[str, int] | None = None
                    ) -> datasets.Dataset:
    """The rows of one epoch.

    Generative variants: indexing rows (every image) co-trained with retrieval rows (training captions), plus
    `captioning_ratio` x the training captions as captioning rows (image -> caption; training captions only, never
    a held-out image's), plus `pseudo_query_slots[key]` pseudo-query rows per image. `indexing_ratio` (None: every
    row once per epoch) sets the share of indexing rows. The dual encoder: (image, caption) pairs, pseudo-queries
    included.
    """
    train_keys, train_captions = splits.train_queries["image_key"][:], splits.train_queries["caption"][:]
    texts = [_rows(train_keys, train_captions, RETRIEVAL, False)]
    slots = [(key, j) for key, count in (pseudo_query_slots or {}).items() for j in range(count)]
    if slots:
        texts.append(_rows([k for k, _ in slots], [""] * len(slots), PSEUDO_QUERY, False, [j for _, j in slots]))
    if variant == DUAL_ENCODER:
        return datasets.concatenate_datasets(texts).shuffle(seed=seed) if len(texts) > 1 else texts[0]
    if not 0.0 <= captioning_ratio <= 1.0:
        raise ValueError(f"captioning_ratio must be in [0, 1], got {captioning_ratio}.")
    if captioning_ratio > 0 and train_keys:
        chosen = sorted(np.random.default_rng(seed).choice(len(train_keys), round(captioning_ratio * len(train_keys)),
                                                           replace=False).tolist())
        texts.append(_rows([train_keys[i] for i in chosen], [train_captions[i] for i in chosen], CAPTIONING, False))
    others = datasets.concatenate_datasets(texts) if len(texts) > 1 else texts[0]
    keys = splits.index["image_key"][:]
    indexing = _rows(keys, [""] * len(keys), INDEXING, False)
    if len(others) == 0 or indexing_ratio == 1.0:
        return indexing
    if indexing_ratio is None:
        return datasets.concatenate_datasets([indexing, others]).shuffle(seed=seed)
    if not 0.0 < indexing_ratio < 1.0:
        raise ValueError(f"indexing_ratio must be in (0, 1], got {indexing_ratio}.")
    return datasets.interleave_datasets([indexing, others], probabilities=[indexing_ratio, 1 - indexing_ratio],
                                        seed=seed, stopping_strategy="all_exhausted")


def evaluation_sets(splits: DSISplits, max_index_eval_images: int | None = None) -> dict[str, datasets.Dataset]:
    """Metric prefix -> query rows: `eval` (captions of held-out images), `seen`, `index` (image -> id, on at most
    `max_index_eval_images` images spread over the index; 0 leaves it out, None measures every image)."""
    sets = {}
    if len(splits.eval_queries):
        sets["eval"] = _rows(splits.eval_queries["image_key"][:], splits.eval_queries["caption"][:], RETRIEVAL, True)
    if len(splits.seen_queries):
        sets["seen"] = _rows(splits.seen_queries["image_key"][:], splits.seen_queries["caption"][:], RETRIEVAL, True)
    if max_index_eval_images == 0:  # indexing accuracy not measured
        return sets
    keys = splits.index["image_key"][:]
    if max_index_eval_images is not None:
        keys = keys[:: max(1, len(keys) // max_index_eval_images)][:max_index_eval_images]
    sets["index"] = _rows(keys, [""] * len(keys), INDEXING, True)
    return sets


class DSICollator:
    """Rows -> model inputs. Training rows: image inputs first (indexing, then captioning), then captions, with
    `labels` in that order: identifiers, or `[caption token] + caption` for captioning rows (generative), or
    image positions (dual encoder). Evaluation rows: inputs plus `gold_index` and `query_id` (and `query_text`,
    the captions themselves, for caption queries)."""

    def __init__(self, index: ImageIndex, images: ImageSource, processor, variant: str, *, augment: bool = False,
                 caption_token_id: int | None = None, pseudo_queries=None, image_cache_mb: float = 4096,
                 seed: int = 42):
        """`processor`: a `ViTT5DSIProcessor`. `augment` applies a mild random resized crop to training images
        only; evaluation rows, also those of evaluations during training, are never augmented. Flips and colour
        jitter are left out: they would contradict captions that name sides and colours. `pseudo_queries` (a
        `PseudoQueries`, refreshed in place during training) fills pseudo-query rows; an image without any yet
        is indexed instead. Images are decoded and resized once and kept as uint8 up to `image_cache_mb`, in
        memory shared by this process's DataLoader workers (0 decodes every time): later epochs only convert and
        augment (`DecodedImages`).
        `seed` and `epoch` seed each row's crop."""
        self.index, self.images, self.processor, self.variant = index, images, processor, variant
        self.caption_token_id, self.pseudo_queries = caption_token_id, pseudo_queries
        self.decoded_images = DecodedImages(images, processor, image_cache_mb)
        self._crop = None
        self.seed, self.epoch = seed, 0
        self._positions: dict[str, int] = {}
        self._label_cache: dict[str, list[int]] = {}
        if augment:
            from torchvision.transforms import RandomResizedCrop

            size = processor.image_size
            self._crop = RandomResizedCrop((size, size), scale=(0.8, 1.0), ratio=(0.9, 1.1))

    def _pixels(self, keys, training: bool = False, rows: list[dict] | None = None):
        if not training or self._crop is None:
            return self.decoded_images.pixel_values(keys)
        return self.decoded_images.pixel_values(keys, [self._seeded_crop(row) for row in rows])

    def _seeded_crop(self, row: dict):
        """The random crop of one training row, drawn from a generator seeded by (seed, epoch, row): the crops
        then depend on neither the global RNG nor how far the DataLoader had read ahead, so a resumed run crops
        exactly as the uninterrupted one (`epoch` is set by the trainer at each epoch's start)."""
        identity = f"{self.seed}/{self.epoch}/{row['kind']}/{row['query_id']}/{row['slot']}/{row['image_key']}"
        seed = int.from_bytes(hashlib.blake2b(identity.encode(), digest_size=8).digest(), "little")

        def crop(image):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return self._crop(image)

        return crop

    def _position(self, key: str) -> int:
        """The index answers by binary search over packed keys (compact at catalogue scale, ~50 us a lookup); a
        training run asks for the same keys every epoch, so the collator keeps what it has looked up."""
        position = self._positions.get(key)
        if position is None:
            position = self._positions[key] = self.index.position_of_key[key]
        return position

    def _labels(self, key: str) -> list[int]:
        labels = self._label_cache.get(key)
        if labels is None:
            labels = self._label_cache[key] = self.index.labels_for(key)
        return labels

    def _text(self, captions):
        return dict(self.processor(text=captions))

    def _caption_labels(self, captions) -> list[list[int]]:
        if self.caption_token_id is None:
            raise ValueError("Captioning rows need a model with a caption token (model.enable_captioning).")
        tokenized = self.processor.tokenizer(captions, truncation=True,
                                             max_length=self.processor.max_caption_length)["input_ids"]
        return [[self.caption_token_id] + list(ids) for ids in tokenized]

    @staticmethod
    def _pad(labels: list[list[int]]) -> torch.Tensor:
        width = max(len(label) for label in labels)
        return torch.tensor([label + [-100] * (width - len(label)) for label in labels])

    def _resolve_pseudo_queries(self, rows: list[dict]) -> list[dict]:
        resolved = []
        for row in rows:
            if row["kind"] == PSEUDO_QUERY:
                texts = self.pseudo_queries.for_key(row["image_key"]) if self.pseudo_queries is not None else []
                if texts:
                    row = {**row, "kind": RETRIEVAL, "caption": texts[row["slot"] % len(texts)]}
                elif self.variant == DUAL_ENCODER:
                    continue
                else:
                    row = {**row, "kind": INDEXING}
            resolved.append(row)
        return resolved

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        rows = self._resolve_pseudo_queries(rows)
        images = [r for r in rows if r["kind"] == INDEXING]
        captions = [r for r in rows if r["kind"] == RETRIEVAL]
        captioning = [r for r in rows if r["kind"] == CAPTIONING]
        if captioning and self.pseudo_queries is not None and self.pseudo_queries.captioning_finished:
            captioning = []  # the last pseudo-queries are written: the caption decoder has done its job
        batch: dict[str, torch.Tensor] = {}
        if rows[0]["evaluate"]:
            if images and captions:
                raise ValueError("An evaluation batch mixes image and caption queries.")
            query_rows = images or captions
            if images:
                batch["pixel_values"] = self._pixels([r["image_key"] for r in images])
            else:
                batch.update(self._text([r["caption"] for r in captions]))
            batch["gold_index"] = torch.tensor([self._position(r["image_key"]) for r in query_rows])
            batch["query_id"] = torch.tensor([r["query_id"] for r in query_rows])
            if captions:  # the raw text, for a re-ranker with its own tokenizer (a list: never sent to a device)
                batch["query_text"] = [r["caption"] for r in captions]
            return batch
        if self.variant == DUAL_ENCODER:
            keys = [r["image_key"] for r in captions]
            batch["pixel_values"] = self._pixels(keys, training=True, rows=captions)
            batch.update(self._text([r["caption"] for r in captions]))
            batch["labels"] = torch.tensor([self._position(k) for k in keys])
            return batch
        image_rows = images + captioning
        if image_rows:
            batch["pixel_values"] = self._pixels([r["image_key"] for r in image_rows], training=True, rows=image_rows)
        if captions:
            batch.update(self._text([r["caption"] for r in captions]))
        labels = ([self._labels(r["image_key"]) for r in images]
                  + (self._caption_labels([r["caption"] for r in captioning]) if captioning else [])
                  + [self._labels(r["image_key"]) for r in captions])
        batch["labels"] = self._pad(labels)
        return batch


__all__ = ["ImageSource", "training_stream", "evaluation_sets", "DSICollator", "INDEXING", "RETRIEVAL",
           "CAPTIONING", "PSEUDO_QUERY"]
