"""Load an image-caption collection from the layouts users already have on disk, and check it before training.

Three layouts, one result (`ImageCollection`): the Karpathy split file (Flickr30K, MS-COCO) plus an image
directory; the Hub parquet layout of Flickr30K (local directory or dataset name); the original prototype's JSONL.
Every problem is reported with the file and the item at fault, before any training starts.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import datasets
from PIL import Image
from tqdm.auto import tqdm

from ..checkpoint.checkpoint_io import CollectionError
from ..checkpoint.processing_vit_t5_dsi import open_image

logger = logging.getLogger(__name__)

KNOWN_SPLITS = ("train", "val", "test", "restval")


@dataclass
class ImageCollection:
    """`images`: image_key, image (path or {"bytes", "path"}), split. `captions`: image_key, caption,
    evaluation_only (True for captions the data files reserve for evaluation: they never reach training)."""

    images: datasets.Dataset
    captions: datasets.Dataset
    source: str

    def __len__(self) -> int:
        return len(self.images)


def _check_keys(keys, caption_keys, source) -> None:
    seen = {}
    for i, key in enumerate(keys):
        if key in seen:
            raise CollectionError(f"{source}: duplicate image key {key!r} (items #{seen[key]} and #{i}).")
        seen[key] = i
    for i, key in enumerate(caption_keys):
        if key not in seen:
            raise CollectionError(f"{source}: caption #{i} refers to unknown image {key!r}.")


def _captions(caption_keys, captions, evaluation_only=None) -> datasets.Dataset:
    flags = list(evaluation_only) if evaluation_only is not None else [False] * len(caption_keys)
    return datasets.Dataset.from_dict({"image_key": caption_keys, "caption": captions, "evaluation_only": flags})


def _build(keys, images, splits, caption_keys, captions, source, evaluation_only=None) -> ImageCollection:
    _check_keys(keys, caption_keys, source)
    image_ds = datasets.Dataset.from_dict({"image_key": keys, "image": images, "split": splits})
    return ImageCollection(image_ds, _captions(caption_keys, captions, evaluation_only), source)


def _image_path(where: str, base: str, name) -> str:
    """`name` joined to `base`, refused when it is absolute or climbs out of `base` (`..`): a data file must not
    make the run read arbitrary files of the machine."""
    if not isinstance(name, str) or not name.strip():
        raise CollectionError(f"{where}: the image path is empty.")
    normalised = os.path.normpath(name)
    if os.path.isabs(name) or normalised == ".." or normalised.startswith(".." + os.sep):
        raise CollectionError(f"{where}: image path {name!r} leaves the image directory {base!r} (absolute or '..' "
                              "paths are refused).")
    return os.path.join(base, normalised)


def _check_split(source, item, split):
    if split not in KNOWN_SPLITS:
        raise CollectionError(f"{source}: {item} has unknown split {split!r} (expected one of "
                              f"{', '.join(KNOWN_SPLITS)}).")


def _check_caption(source, item, number, caption):
    if not isinstance(caption, str) or not caption.strip():
        raise CollectionError(f"{source}: {item} caption #{number} is empty.")


def load_karpathy(json_path: str, image_dir: str, require_captions: bool = True) -> ImageCollection:
    """`dataset_flickr30k.json` / `dataset_coco.json`: images[] with filename, split, sentences[].raw."""
    try:
        with open(json_path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError as err:
        raise CollectionError(f"{json_path}: no such file.") from err
    except json.JSONDecodeError as err:
        raise CollectionError(f"{json_path}: not valid JSON ({err}).") from err
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise CollectionError(f"{json_path}: no 'images' list; is this a Karpathy split file "
                              "(dataset_flickr30k.json / dataset_coco.json)?")
    keys, images, splits, caption_keys, captions = [], [], [], [], []
    for i, entry in enumerate(data["images"]):
        filename = entry.get("filename") if isinstance(entry, dict) else None
        if not filename:
            raise CollectionError(f"{json_path}: images[{i}] has no 'filename'.")
        item = f"image {filename!r} (images[{i}])"
        split = entry.get("split", "train")
        _check_split(json_path, item, split)
        key = os.path.join(entry["filepath"], filename) if entry.get("filepath") else filename
        sentences = entry.get("sentences") or []
        if require_captions and not sentences:
            raise CollectionError(f"{json_path}: {item} has no captions (sentences is empty).")
        for j, sentence in enumerate(sentences):
            raw = sentence.get("raw") if isinstance(sentence, dict) else sentence
            _check_caption(json_path, item, j, raw)
            caption_keys.append(key)
            captions.append(raw.strip())
        keys.append(key)
        images.append(_image_path(f"{json_path}: {item}", image_dir, key))
        splits.append(split)
    return _build(keys, images, splits, caption_keys, captions, json_path)


def load_hub_parquet(path_or_name: str, require_captions: bool = True) -> ImageCollection:
    """Flickr30K's Hub layout: columns image, caption (list), split, filename (and img_id)."""
    if os.path.isdir(path_or_name):
        files = sorted(glob.glob(os.path.join(path_or_name, "**", "*.parquet"), recursive=True))
        if not files:
            raise CollectionError(f"{path_or_name}: no .parquet files in this directory.")
        table = datasets.load_dataset("parquet", data_files=files, split="train")
    else:
        loaded = datasets.load_dataset(path_or_name)
        table = datasets.concatenate_datasets(list(loaded.values())) if isinstance(loaded, dict) else loaded
    missing = {"image", "caption"} - set(table.column_names)
    if missing:
        raise CollectionError(f"{path_or_name}: parquet layout lacks column(s) {sorted(missing)}; expected image, "
                              "caption, split, filename.")
    table = table.cast_column("image", datasets.Image(decode=False))
    filenames = table["filename"][:] if "filename" in table.column_names else [str(i) for i in table["img_id"][:]]
    split_column = table["split"][:] if "split" in table.column_names else ["train"] * len(table)
    caption_keys, captions = [], []
    for i, (key, split, caption_list) in enumerate(zip(filenames, split_column, table["caption"][:])):
        item = f"row {i} ({key!r})"
        _check_split(path_or_name, item, split)
        caption_list = [caption_list] if isinstance(caption_list, str) else list(caption_list or [])
        if require_captions and not caption_list:
            raise CollectionError(f"{path_or_name}: {item} has no captions.")
        for j, caption in enumerate(caption_list):
            _check_caption(path_or_name, item, j, caption)
            caption_keys.append(key)
            captions.append(caption.strip())
    _check_keys(filenames, caption_keys, path_or_name)
    # the image bytes stay in the (memory-mapped) parquet table; only keys and splits are new columns
    images = table.select_columns(["image"]).add_column("image_key", list(filenames)).add_column(
        "split", list(split_column))
    return ImageCollection(images.select_columns(["image_key", "image", "split"]), _captions(caption_keys, captions),
                           path_or_name)


def _read_jsonl(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield number, json.loads(line)
                    except json.JSONDecodeError as err:
                        raise CollectionError(f"{path}:{number}: not valid JSON ({err}).") from err
    except FileNotFoundError as err:
        raise CollectionError(f"{path}: no such file.") from err


def load_jsonl(train_file: str, validation_file: str | None = None, image_dir: str | None = None) -> ImageCollection:
    """The prototype's layout: {"image_id", "image"} rows to index, {"image_id", "caption"} rows to query.

    Captions in `validation_file` are evaluation queries and never training captions. Their images are held
    out when no training caption names them; an image with captions in both files stays a training image and
    its validation captions become "seen" queries.
    """
    images, train_captions, eval_captions = {}, [], []
    for path, caption_list in ((train_file, train_captions), (validation_file, eval_captions)):
        if path is None:
            continue
        base = image_dir or os.path.dirname(os.path.abspath(path))
        for number, row in _read_jsonl(path):
            if not isinstance(row, dict) or "image_id" not in row:
                raise CollectionError(f"{path}:{number}: row has no 'image_id'.")
            key = str(row["image_id"])
            if "image" not in row and "caption" not in row:
                raise CollectionError(f"{path}:{number}: row for image {key!r} has neither 'image' nor 'caption'.")
            if "image" in row:
                if key in images:
                    raise CollectionError(f"{path}:{number}: duplicate image key {key!r}.")
                images[key] = _image_path(f"{path}:{number}", base, row["image"])
            if "caption" in row:
                _check_caption(f"{path}:{number}", f"image {key!r}", 0, row["caption"])
                caption_list.append((key, row["caption"].strip(), f"{path}:{number}"))
    for key, _, where in train_captions + eval_captions:
        if key not in images:
            raise CollectionError(f"{where}: caption refers to image {key!r}, which no row indexes.")
    trained = {key for key, _, _ in train_captions}
    evaluated = {key for key, _, _ in eval_captions}
    keys = list(images)
    splits = ["test" if key in evaluated and key not in trained else "train" for key in keys]
    all_captions = train_captions + eval_captions
    evaluation_only = [False] * len(train_captions) + [True] * len(eval_captions)
    return _build(keys, [images[k] for k in keys], splits, [k for k, _, _ in all_captions],
                  [c for _, c, _ in all_captions], train_file, evaluation_only)


def load_collection(karpathy_json: str | None = None, image_dir: str | None = None, dataset_name: str | None = None,
                    train_file: str | None = None, validation_file: str | None = None) -> ImageCollection:
    """The collection named by run_dsi_image.py's data flags (exactly one layout)."""
    given = [name for name, value in (("karpathy_json", karpathy_json), ("dataset_name", dataset_name),
                                      ("train_file", train_file)) if value]
    if len(given) != 1:
        raise CollectionError(f"Pass exactly one of karpathy_json, dataset_name or train_file (got "
                              f"{', '.join(given) or 'none'}).")
    if karpathy_json:
        if not image_dir:
            raise CollectionError("karpathy_json needs image_dir (the directory its file names are relative to).")
        return load_karpathy(karpathy_json, image_dir)
    if dataset_name:
        return load_hub_parquet(dataset_name)
    return load_jsonl(train_file, validation_file, image_dir)


def _image_problem(value) -> str | None:
    """None if the image decodes completely, else what is wrong (JPEGs decode at reduced size: fast)."""
    try:
        with open_image(value) as image:
            image.draft("RGB", (64, 64))
            image.load()
        return None
    except FileNotFoundError:
        return "missing image file"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return f"unreadable or truncated image ({err})"


def check_images(collection: ImageCollection, skip_bad_images: bool = False, num_workers: int = 4,
                 progress: bool = True, chunk_size: int = 512) -> ImageCollection:
    """Open every image once before training. A bad one stops the run with its key and path, or, with
    `skip_bad_images`, is dropped together with its captions, and each dropped key is logged.

    Images are read in chunks: a parquet collection keeps its bytes on disk, not all in memory at once.
    """
    problems: list[str | None] = []
    column = collection.images.select_columns(["image"])
    with ThreadPoolExecutor(num_workers) as pool, tqdm(total=len(column), desc="Checking images",
                                                       disable=not progress, mininterval=1.0) as bar:
        for chunk in column.iter(batch_size=chunk_size):
            problems.extend(pool.map(_image_problem, chunk["image"]))
            bar.update(len(chunk["image"]))
    bad = [(i, p) for i, p in enumerate(problems) if p is not None]
    if not bad:
        return collection
    keys = collection.images["image_key"][:]

    def where(i):
        value = collection.images[i]["image"]
        path = value.get("path") if isinstance(value, dict) else value
        return f"image {keys[i]!r} ({path or 'embedded bytes'}) in {collection.source}"

    if not skip_bad_images:
        first, problem = bad[0]
        raise CollectionError(f"{problem}: {where(first)}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
                              + ". Fix it, or pass skip_bad_images=True (--skip_bad_images) to leave such images out.")
    bad_keys = {keys[i] for i, _ in bad}
    for i, problem in bad:
        logger.warning("Skipping %s: %s", where(i), problem)
    dropped_captions = sum(1 for k in collection.captions["image_key"][:] if k in bad_keys)
    logger.warning("skip_bad_images: left out %d of %d images (%s) and their %d captions.", len(bad),
                   len(problems), ", ".join(sorted(bad_keys)[:20]) + (" ..." if len(bad) > 20 else ""),
                   dropped_captions)
    keep = [i for i in range(len(problems)) if problems[i] is None]
    captions = collection.captions.filter(lambda k: k not in bad_keys, input_columns="image_key")
    return ImageCollection(collection.images.select(keep), captions, collection.source)


__all__ = ["ImageCollection", "CollectionError", "KNOWN_SPLITS", "load_collection", "load_karpathy", "load_hub_parquet", "load_jsonl",
           "check_images"]
