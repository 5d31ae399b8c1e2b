"""Decode any image a collection may hold into the tensor the chosen image tower expects.

Runs inside the collator, so in DataLoader workers when there are any, never in a model's forward pass.
"""

from __future__ import annotations

import io
import os

from PIL import Image


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB for every PIL mode: transparency is composited on white (not black), palette/grey/CMYK converted."""
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: scale to 8 bits before converting
        image = image.point(lambda v: v / 256).convert("L")
    return image.convert("RGB") if image.mode != "RGB" else image


def upright(image: Image.Image) -> Image.Image:
    """`image` turned by its EXIF orientation (a phone photo stored sideways), as transformers' `load_image`
    does; the image itself when it has none (or an unreadable EXIF block)."""
    try:
        orientation = image.getexif().get(0x0112, 1)
    except Exception:
        return image
    if orientation == 1:
        return image
    from PIL import ImageOps

    return ImageOps.exif_transpose(image)


def open_image(value, image_dir: str | None = None) -> Image.Image:
    """A PIL image from a path, a `datasets` Image dict ({"bytes", "path"}), raw bytes or a PIL image."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        if value.get("bytes"):
            return Image.open(io.BytesIO(value["bytes"]))
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value))
    if value is None:
        raise ValueError("image is empty")
    path = os.path.join(image_dir, value) if image_dir and not os.path.isabs(value) else value
    return Image.open(path)


def load_rgb(value, image_dir: str | None = None) -> Image.Image:
    with open_image(value, image_dir) as image:
        image.load()
        return to_rgb(upright(image))


__all__ = ["to_rgb", "upright", "open_image", "load_rgb"]
