"""Decode any image a collection may hold into the tensor the chosen image tower expects.

Runs inside DataLoader workers (through `datasets`' `with_transform`), never in a model's process loop.
"""

from __future__ import annotations

import io
import os

import torch
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
        return to_rgb(image)


class ImagePreprocessor:
    """PIL -> normalised tensor with the image tower's own processor, plus optional training augmentation.

    `augment` uses a mild random resized crop only: flips and colour jitter would contradict captions that name
    sides and colours.
    """

    def __init__(self, processor, augment: bool = False):
        self.processor = processor
        self.augment = augment
        if augment:
            from torchvision.transforms import RandomResizedCrop

            size = self.image_size
            self._crop = RandomResizedCrop((size, size), scale=(0.8, 1.0), ratio=(0.9, 1.1))

    @property
    def image_size(self) -> int:
        size = getattr(self.processor, "size", None) or {}
        if isinstance(size, dict):
            return int(size.get("height") or size.get("shortest_edge") or 224)
        return int(getattr(self.processor, "input_size", (3, 224, 224))[-1])

    @classmethod
    def for_model_config(cls, config, vision_name_or_path: str | None = None, augment: bool = False):
        """The pretrained tower's own processor when there is one; else one matching the config's tower."""
        from transformers import AutoImageProcessor, ViTImageProcessor

        if vision_name_or_path is not None:
            try:
                return cls(AutoImageProcessor.from_pretrained(vision_name_or_path), augment)
            except (OSError, ValueError):
                pass  # a bare timm name, or a checkpoint without a processor file: derive one below
        vision = config.vision_config
        if vision.model_type == "timm_wrapper":
            import timm
            from timm.data import resolve_data_config

            args = dict(vision.model_args or {})
            data_config = resolve_data_config(model=timm.create_model(vision.architecture, pretrained=False, **args))
            size = data_config["input_size"][-1]
            return cls(ViTImageProcessor(size={"height": size, "width": size}, image_mean=list(data_config["mean"]),
                                         image_std=list(data_config["std"])), augment)
        size = config.image_size
        return cls(ViTImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * 3,
                                     image_std=[0.5] * 3), augment)

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        images = [to_rgb(image) for image in images]
        if self.augment:
            images = [self._crop(image) for image in images]
        return self.processor(images=images, return_tensors="pt")["pixel_values"]

    def save_pretrained(self, directory: str) -> None:
        self.processor.save_pretrained(directory)


__all__ = ["to_rgb", "open_image", "load_rgb", "ImagePreprocessor"]
