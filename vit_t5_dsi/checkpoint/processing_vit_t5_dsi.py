"""The processor of a vit-t5-dsi checkpoint: the image tower's image processor plus the caption tokenizer.

It is the `processing_class` the trainer saves into every directory it writes (`checkpoint-N` included), so any
checkpoint carries what turns a user's images and captions into model inputs, and `AutoProcessor` loads it
(`trust_remote_code=True` outside this package).
"""

from __future__ import annotations

import os

from transformers import ProcessorMixin
from transformers.feature_extraction_utils import BatchFeature

from .atomic_io import save_directory_atomically
from .image_processing import to_rgb
from .optional_imports import optional_import


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
            size = data_config["input_size"][-1]
            image_processor = ViTImageProcessor(size={"height": size, "width": size},
                                                image_mean=list(data_config["mean"]), image_std=list(data_config["std"]))
        else:
            size = config.image_size
            image_processor = ViTImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * 3,
                                                image_std=[0.5] * 3)
        return cls(image_processor, tokenizer, max_caption_length)


ViTT5DSIProcessor.register_for_auto_class()

__all__ = ["ViTT5DSIProcessor"]
