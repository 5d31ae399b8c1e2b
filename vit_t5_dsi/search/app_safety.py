"""What the web app (app.py) accepts from a browser and what it serves: app-only, never in a checkpoint.

- Text: at most `MAX_QUERY_CHARS` characters (the model reads its first 64 tokens, a few hundred characters; a
  100,000-character paste is refused with a message rather than tokenised), control and bidirectional
  formatting characters removed (`checkpoint.processing_vit_t5_dsi.clean_text`, which the pipeline applies too).
- Uploads are decoded here, not by Gradio, so every bad file gets a message in the page: empty, not an image,
  truncated, or over Pillow's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`, 89.5 M pixels: refused
  from the header, before any pixel is decoded); CMYK, 16-bit, palette and EXIF-rotated images are converted
  upright to RGB (`processing_vit_t5_dsi.upright_rgb`).
- Files: Gradio serves its own uploads and cache, the `allowed_paths` given to `launch` (the collection's image
  folder) and nothing else; `blocked_paths` (the checkpoint and its dense re-ranker) wins over both. Gradio
  resolves symlinks and `..` before it checks, and the pipeline never names a file outside the image folder
  (`ImageIndex.image_path`), so no result points beyond it either.
"""

from __future__ import annotations

import os

from ..checkpoint.image_index import is_inside
from ..checkpoint.processing_vit_t5_dsi import clean_text, upright_rgb

MAX_QUERY_CHARS = 2000
MAX_UPLOAD = "20mb"  # Gradio's max_file_size: larger uploads are refused before they are stored
DEFAULT_CONCURRENCY_LIMIT = 1  # searches at a time: generation on one model is serialised anyway (SearchPage lock)
DEFAULT_MAX_QUEUE_SIZE = 100  # requests waiting beyond this are refused with "queue full" instead of piling up


class RefusedQuery(ValueError):
    """A query the app answers with this message instead of searching."""


def check_text(text: str) -> tuple[str, list[str]]:
    """The text to search and notes for the page; RefusedQuery for one too long to be a caption."""
    if len(text) > MAX_QUERY_CHARS:
        raise RefusedQuery(f"The query is {len(text):,} characters long; captions here are at most "
                           f"{MAX_QUERY_CHARS:,} (the model reads about the first 64 words). Shorten it.")
    cleaned, removed = clean_text(text)
    notes = [f"Removed {removed} control or text-direction character{'s' if removed != 1 else ''} from the "
             "query."] if removed else []
    return cleaned, notes


def read_upload(value):
    """An uploaded image (a path, Gradio's file payload {"path": ...}, or a PIL image) as upright RGB, or
    RefusedQuery saying why not."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, Image.Image):
        return upright_rgb(value)
    path = value.get("path") if isinstance(value, dict) else value
    if not path or not os.path.isfile(path):
        raise RefusedQuery("The upload carried no file: upload an image (PNG, JPEG, WebP, ...).")
    name, size = value.get("orig_name") if isinstance(value, dict) else None, os.path.getsize(path)
    name = name or os.path.basename(path)
    if size == 0:
        raise RefusedQuery(f"The uploaded file {name} is empty (0 bytes): upload an image.")
    limit = Image.MAX_IMAGE_PIXELS
    try:
        with Image.open(path) as image:
            if limit and image.width * image.height > limit:
                raise Image.DecompressionBombError(f"{image.width} x {image.height}")
            image.load()
            return upright_rgb(image)
    except Image.DecompressionBombError:
        raise RefusedQuery(f"The uploaded image {name} is refused: its size is over Pillow's limit of "
                           f"{limit:,} pixels (PIL.Image.MAX_IMAGE_PIXELS), a guard against decompression bombs. "
                           "Upload a smaller image.") from None
    except UnidentifiedImageError:
        raise RefusedQuery(f"The uploaded file {name} ({size:,} bytes) is not an image Pillow can read "
                           "(whatever its name says). Upload a PNG, JPEG, WebP, ... image.") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise RefusedQuery(f"The uploaded image {name} could not be decoded: it is truncated or corrupt "
                           f"({err}).") from None


def served_folders(search, image_dir: str | None) -> list[str]:
    """`allowed_paths`: the collection's image folder (--image_dir, else the root recorded with the index). A
    root that is the whole file system (images indexed from scattered folders) is not served."""
    roots = [image_dir] if image_dir else ([search.image_index.image_root] if search.image_index.image_root else [])
    return [os.path.realpath(root) for root in roots if os.path.dirname(os.path.realpath(root)) !=
            os.path.realpath(root)]


def blocked_folders(model_dirs: list[str], served: list[str]) -> list[str]:
    """`blocked_paths`: the checkpoint folders (the model, its dense re-ranker); when the image folder lies inside
    one of them, every entry of it but the one holding the images."""
    blocked = []
    for folder in (os.path.realpath(d) for d in model_dirs if d and os.path.isdir(d)):
        inside = [root for root in served if is_inside(root, folder)]
        if not inside:
            blocked.append(folder)
            continue
        for name in os.listdir(folder):
            entry = os.path.join(folder, name)
            if not any(is_inside(root, entry) for root in inside):
                blocked.append(entry)
    return blocked


__all__ = ["MAX_QUERY_CHARS", "MAX_UPLOAD", "DEFAULT_CONCURRENCY_LIMIT", "DEFAULT_MAX_QUEUE_SIZE", "RefusedQuery",
           "check_text", "read_upload", "served_folders", "blocked_folders"]
