"""The example streams the trainer reads and the collator that turns rows into model inputs.

Datasets hold only keys and captions; the collator opens, converts and resizes images and tokenizes captions.
It runs in DataLoader workers, so no image work happens in the training process and no model runs per sample.
"""

from __future__ import annotations

import datasets
import torch
from tqdm.auto import tqdm

from .dsi_splits import DSISplits
from .image_index import ImageIndex
from .image_processing import load_rgb

INDEXING, RETRIEVAL = 0, 1  # `kind` of a row: image -> id, or caption -> id


class ImageSource:
    """Random access to the indexed images by key (the Arrow table is memory-mapped or small)."""

    def __init__(self, index_dataset: datasets.Dataset):
        self.dataset = index_dataset
        self.position = {key: i for i, key in enumerate(index_dataset["image_key"][:])}

    def load(self, key: str):
        return load_rgb(self.dataset[self.position[key]]["image"])

    def batches(self, keys, processor, batch_size: int, desc: str | None = None):
        """Pixel tensors for `keys`, batch by batch, in order (with a progress bar when `desc` is given)."""
        starts = range(0, len(keys), batch_size)
        for start in tqdm(starts, desc=desc, disable=desc is None, mininterval=1.0):
            yield processor(images=[self.load(k) for k in keys[start:start + batch_size]])["pixel_values"]


def _rows(keys, captions, kind, evaluate) -> datasets.Dataset:
    """`query_id` numbers evaluation rows so padding duplicates of distributed evaluation can be dropped."""
    return datasets.Dataset.from_dict({"image_key": list(keys), "caption": list(captions),
                                       "kind": [kind] * len(keys), "evaluate": [evaluate] * len(keys),
                                       "query_id": list(range(len(keys)))})


def training_stream(splits: DSISplits, variant: str, indexing_ratio: float | None = None,
                    seed: int = 42) -> datasets.Dataset:
    """Generative variants: indexing and retrieval rows co-trained, `indexing_ratio` of them indexing (None:
    every image once and every caption once per epoch). The dual encoder: (image, caption) pairs."""
    retrieval = _rows(splits.train_queries["image_key"][:], splits.train_queries["caption"][:], RETRIEVAL, False)
    if variant == "dual_encoder":
        return retrieval
    keys = splits.index["image_key"][:]
    indexing = _rows(keys, [""] * len(keys), INDEXING, False)
    if len(retrieval) == 0 or indexing_ratio == 1.0:
        return indexing
    if indexing_ratio is None:
        return datasets.concatenate_datasets([indexing, retrieval]).shuffle(seed=seed)
    if not 0.0 < indexing_ratio < 1.0:
        raise ValueError(f"indexing_ratio must be in (0, 1], got {indexing_ratio}.")
    return datasets.interleave_datasets([indexing, retrieval], probabilities=[indexing_ratio, 1 - indexing_ratio],
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
    """Rows -> model inputs. Training rows: images first, then captions, with identifier `labels` (generative)
    or image-position `labels` (dual encoder). Evaluation rows: inputs plus `gold_index` and `query_id`."""

    def __init__(self, index: ImageIndex, images: ImageSource, processor, variant: str, augment: bool = False):
        """`processor`: a `ViTT5DSIProcessor`. `augment` applies a mild random resized crop to training images
        only; evaluation rows, also those of evaluations during training, are never augmented. Flips and colour
        jitter are left out: they would contradict captions that name sides and colours."""
        self.index, self.images, self.processor, self.variant = index, images, processor, variant
        self._crop = None
        if augment:
            from torchvision.transforms import RandomResizedCrop

            size = processor.image_size
            self._crop = RandomResizedCrop((size, size), scale=(0.8, 1.0), ratio=(0.9, 1.1))

    def _pixels(self, keys, training: bool = False):
        images = [self.images.load(k) for k in keys]
        if training and self._crop is not None:
            images = [self._crop(image) for image in images]
        return self.processor(images=images)["pixel_values"]

    def _text(self, captions):
        return dict(self.processor(text=captions))

    def _labels(self, keys) -> torch.Tensor:
        labels = [self.index.labels_for(k) for k in keys]
        width = max(len(label) for label in labels)
        return torch.tensor([label + [-100] * (width - len(label)) for label in labels])

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        images = [r for r in rows if r["kind"] == INDEXING]
        captions = [r for r in rows if r["kind"] == RETRIEVAL]
        batch: dict[str, torch.Tensor] = {}
        if rows[0]["evaluate"]:
            if images and captions:
                raise ValueError("An evaluation batch mixes image and caption queries.")
            query_rows = images or captions
            if images:
                batch["pixel_values"] = self._pixels([r["image_key"] for r in images])
            else:
                batch.update(self._text([r["caption"] for r in captions]))
            batch["gold_index"] = torch.tensor([self.index.position_of_key[r["image_key"]] for r in query_rows])
            batch["query_id"] = torch.tensor([r["query_id"] for r in query_rows])
            return batch
        if self.variant == "dual_encoder":
            keys = [r["image_key"] for r in captions]
            batch["pixel_values"] = self._pixels(keys, training=True)
            batch.update(self._text([r["caption"] for r in captions]))
            batch["labels"] = torch.tensor([self.index.position_of_key[k] for k in keys])
            return batch
        if images:
            batch["pixel_values"] = self._pixels([r["image_key"] for r in images], training=True)
        if captions:
            batch.update(self._text([r["caption"] for r in captions]))
        batch["labels"] = self._labels([r["image_key"] for r in images + captions])
        return batch


__all__ = ["ImageSource", "training_stream", "evaluation_sets", "DSICollator", "INDEXING", "RETRIEVAL"]
