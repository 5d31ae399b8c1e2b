"""The processor of a vit-t5-dsi checkpoint (the image tower's image processor plus the caption tokenizer), and what
any image or query goes through before it reaches a model.

The processor is the `processing_class` the trainer saves into every directory it writes (`checkpoint-N`
included), so any checkpoint carries what turns a user's images and captions into model inputs, and
`AutoProcessor` loads it (`trust_remote_code=True` outside this package).

Images: any image a collection may hold is decoded into the tensor the chosen image tower expects. That runs
inside the collator, so in DataLoader workers when there are any, never in a model's forward pass. Query images
are turned upright by their EXIF orientation (as `transformers.image_utils.load_image` does) and converted to RGB
from any mode (CMYK, 16-bit grey, palette with transparency: `to_rgb`).

Query text (`clean_text`, whoever sent it): control characters (a pasted NUL, an escape sequence) and
bidirectional formatting controls (U+202E RIGHT-TO-LEFT OVERRIDE and kin, which make text display other than it
reads) are removed, whitespace is collapsed; right-to-left scripts themselves (Arabic, Hebrew) are kept and
searched like any text. Lone surrogates cannot reach the tokenizer. A query of any length is safe: the processor
keeps its first `max_caption_length` tokens.
"""

from __future__ import annotations

import io
import os
import unicodedata

from PIL import Image
from transformers import ProcessorMixin
from transformers.feature_extraction_utils import BatchFeature

from .checkpoint_io import optional_import, save_directory_atomically


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


# bidirectional formatting controls: embeddings, overrides, isolates and marks
BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c")


def clean_text(text: str) -> tuple[str, int]:
    """`text` without control characters, bidirectional controls and lone surrogates (whitespace of any kind
    becomes one space), and how many characters were removed."""
    kept, removed = [], 0
    for char in text:
        if char.isspace():
            kept.append(" ")
        elif char in BIDI_CONTROLS or unicodedata.category(char) in ("Cc", "Cs"):
            removed += 1
        else:
            kept.append(char)
    return " ".join("".join(kept).split()), removed


def upright_rgb(image):
    """A PIL image as the model reads it: turned by its EXIF orientation, then RGB."""
    return to_rgb(upright(image))


class ViTT5DSIProcessor(ProcessorMixin):
    """`processor(images=[PIL...], text=["a red circle"])` -> `pixel_values`, `input_ids`, `attention_mask`.

    Images of any PIL mode are converted to RGB first (transparency on white, as the collection was indexed);
    captions are padded and truncated to `max_caption_length` tokens.
    """

    def __init__(self, image_processor, tokenizer, max_caption_length: int = 64, **kwargs):
        self.max_caption_length = max_caption_length
        super().__init__(image_processor, tokenizer, **kwargs)

    def __call__(self, images=None, text=None, return_tensors: str = "pt", **kwargs) -> BatchFeature:
        if images is None and text is None:
            raise ValueError("Pass images, text, or both.")
        features = {}
        if images is not None:
            images = [images] if not isinstance(images, (list, tuple)) else images
            features["pixel_values"] = self.image_processor(images=[to_rgb(image) for image in images],
                                                            return_tensors=return_tensors)["pixel_values"]
        if text is not None:
            text = [text] if isinstance(text, str) else list(text)
            features.update(self.tokenizer(text, padding=True, truncation=True, max_length=self.max_caption_length,
                                           return_tensors=return_tensors, **kwargs))
        return BatchFeature(features)

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs) -> list[str]:
        """transformers' save, written into a folder of its own first (see `save_directory_atomically`): a full
        disk leaves the previous files loadable and raises `DiskFullError` naming the folder, and every file gets
        ordinary permissions. With `push_to_hub=True` the saved files are then uploaded, as transformers does."""
        save_directory = os.fspath(save_directory)
        if push_to_hub:
            from transformers.utils.hub import hf_api

            commit_message = kwargs.pop("commit_message", None)
            repo_id = kwargs.pop("repo_id", save_directory.split(os.path.sep)[-1])
            repo_id = hf_api().create_repo(repo_id, exist_ok=True, **kwargs).repo_id
            timestamps = self._get_files_timestamps(save_directory) if os.path.isdir(save_directory) else {}
        save = super().save_pretrained
        files, _ = save_directory_atomically(save_directory, lambda folder: save(folder, **kwargs))
        files = [os.path.join(save_directory, os.path.basename(path)) for path in files]  # not the staging folder
        if push_to_hub:
            self._upload_modified_files(save_directory, repo_id, timestamps, commit_message=commit_message,
                                        token=kwargs.get("token"))
        return files

    @property
    def image_size(self) -> int:
        """Square input resolution the image processor produces."""
        size = getattr(self.image_processor, "size", None)
        if size is None:
            return 224
        if isinstance(size, int):
            return size
        for name in ("height", "shortest_edge"):  # a dict, or transformers' SizeDict
            value = size.get(name) if isinstance(size, dict) else getattr(size, name, None)
            if value:
                return int(value)
        return 224

    @classmethod
    def for_model(cls, config, tokenizer, vision_name_or_path: str | None = None,
                  max_caption_length: int = 64) -> "ViTT5DSIProcessor":
        """The pretrained image tower's own image processor when it has one; else one matching the config."""
        from transformers import AutoImageProcessor, ViTImageProcessor

        if vision_name_or_path is not None:
            try:
                return cls(AutoImageProcessor.from_pretrained(vision_name_or_path), tokenizer, max_caption_length)
            except (OSError, ValueError):
                pass  # a bare timm name, or a checkpoint without a processor file: derive one below
        vision = config.vision_config
        if vision.model_type == "timm_wrapper":
            timm = optional_import("timm", "a timm image tower")
            resolve_data_config = optional_import("timm.data", "a timm image tower").resolve_data_config

            args = dict(vision.model_args or {})
            data_config = resolve_data_config(model=timm.create_model(vision.architecture, pretrained=False, **args))
            size, mean, std = data_config["input_size"][-1], list(data_config["mean"]), list(data_config["std"])
            image_processor = ViTImageProcessor(size={"height": size, "width": size}, image_mean=mean, image_std=std)
        else:
            size = config.image_size
            image_processor = ViTImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * 3,
                                                image_std=[0.5] * 3)
        return cls(image_processor, tokenizer, max_caption_length)


ViTT5DSIProcessor.register_for_auto_class()


__all__ = ["to_rgb", "upright", "open_image", "load_rgb", "clean_text", "upright_rgb", "BIDI_CONTROLS",
           "ViTT5DSIProcessor"]
