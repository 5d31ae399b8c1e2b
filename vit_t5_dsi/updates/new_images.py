"""The images to add, from whatever a user holds: files, a folder, a collection file, or PIL images with keys.

Captions that come with a collection are ignored here: an update trains only on pseudo-queries the model writes
itself and on the old collection's rows, so a new image's real captions can stay evaluation queries.
"""

from __future__ import annotations

import glob
import io
import os
from collections.abc import Mapping
from dataclasses import dataclass

import datasets
from PIL import Image

from ..checkpoint.checkpoint_io import UsageError
from ..data.collection import ImageCollection, check_images, load_hub_parquet, load_jsonl, load_karpathy

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class NewImages:
    """Keys, what the image loader reads for each (a path or {"bytes", "path"}), and each file's path (None for
    an image given as pixels)."""

    keys: list[str]
    values: list
    paths: list[str | None]

    def __len__(self) -> int:
        return len(self.keys)


def _from_collection(collection: ImageCollection) -> NewImages:
    keys = [str(k) for k in collection.images["image_key"][:]]
    values = collection.images["image"][:]
    paths = [v if isinstance(v, str) else (v or {}).get("path") if isinstance(v, dict) else None for v in values]
    return NewImages(keys, values, [os.path.abspath(p) if p and os.path.isfile(p) else None for p in paths])


def _pixels(image) -> dict:
    """A PIL image (or raw bytes) as the {"bytes", "path"} value the loader reads."""
    if isinstance(image, (bytes, bytearray)):
        return {"bytes": bytes(image), "path": None}
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def _from_pairs(pairs, source: str) -> NewImages:
    keys, values, paths = [], [], []
    for key, image in pairs:
        if isinstance(image, (str, os.PathLike)):
            path = os.path.abspath(os.fspath(image))
            if not os.path.isfile(path):
                raise UsageError(f"{source}: image {str(key)!r}: no such file {path}.")
            keys.append(str(key)), values.append(path), paths.append(path)
        elif isinstance(image, (Image.Image, bytes, bytearray)):
            keys.append(str(key)), values.append(_pixels(image)), paths.append(None)
        else:
            raise UsageError(f"{source}: image {str(key)!r} is a {type(image).__name__}; give a path, bytes or a "
                             "PIL image.")
    return NewImages(keys, values, paths)


def _folder(folder: str) -> NewImages:
    files = sorted(f for f in glob.glob(os.path.join(folder, "**", "*"), recursive=True)
                   if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(f))
    if not files:
        raise UsageError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder.")
    return _from_pairs([(os.path.relpath(f, folder).replace(os.sep, "/"), f) for f in files], folder)


def load_new_images(images, image_dir: str | None = None) -> NewImages:
    """`images`: a folder of image files (keys: paths relative to it), a folder of parquet files (the Hub layout),
    a Karpathy `.json` (with `image_dir`, default its own folder), a prototype `.jsonl` ({"image_id", "image"}
    rows), one image file, an `ImageCollection`, a {key: path | PIL image | bytes} mapping, or a list of paths
    (keys: file names) or of (key, image) pairs. Every image is opened once; a bad one is an error naming it."""
    if isinstance(images, ImageCollection):
        found = _from_collection(images)
    elif isinstance(images, (str, os.PathLike)):
        path = os.fspath(images)
        if os.path.isdir(path):
            found = (_from_collection(load_hub_parquet(path, require_captions=False))
                     if glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True) else _folder(path))
        elif path.endswith(".json"):
            found = _from_collection(load_karpathy(path, image_dir or os.path.dirname(os.path.abspath(path)),
                                                   require_captions=False))
        elif path.endswith(".jsonl"):
            found = _from_collection(load_jsonl(path, image_dir=image_dir))
        elif os.path.isfile(path):
            found = _from_pairs([(os.path.basename(path), path)], path)
        else:
            raise UsageError(f"{path}: no such file or folder of images to add.")
    elif isinstance(images, Mapping):
        found = _from_pairs(images.items(), "images")
    else:
        items = list(images)
        if all(isinstance(i, (str, os.PathLike)) for i in items):
            found = _from_pairs([(os.path.basename(os.fspath(i)), i) for i in items], "images")
        elif all(isinstance(i, (tuple, list)) and len(i) == 2 for i in items):
            found = _from_pairs(items, "images")
        else:
            raise UsageError("images: give paths, a folder, a collection file, or (key, image) pairs / a {key: image} "
                             "mapping for PIL images.")
    if not found.keys:
        raise UsageError("images: nothing to add.")
    seen: dict[str, int] = {}
    for i, key in enumerate(found.keys):
        if key in seen:
            raise UsageError(f"images: key {key!r} is given twice (items #{seen[key]} and #{i}).")
        seen[key] = i
    as_dicts = [v if isinstance(v, dict) else {"bytes": None, "path": v} for v in found.values]
    check_images(ImageCollection(datasets.Dataset.from_dict({"image_key": found.keys, "image": as_dicts}),
                                 datasets.Dataset.from_dict({"image_key": [], "caption": []}), "the images to add"),
                 progress=False)
    return found


__all__ = ["NewImages", "load_new_images", "IMAGE_EXTENSIONS"]
