"""The collection the data flags name: a user's files, or the built-in synthetic demo (drawn once, on disk).

Shared by `run_dsi_image.py` and the data scripts, so every command sees the same images for the same flags.
"""

from __future__ import annotations

import contextlib
import logging
import os

from .collection import ImageCollection, load_collection, load_karpathy
from .synthetic_scenes import generate_scenes

logger = logging.getLogger(__name__)


def collection_for(data_args, seed: int, main_process_first=None) -> ImageCollection:
    """`data_args`: `vit_t5_dsi.training.arguments.DataArguments`. `main_process_first` (TrainingArguments'): under DDP
    the main process draws the demo scenes while the others wait."""
    if not data_args.is_demo:
        return load_collection(data_args.karpathy_json, data_args.image_dir, data_args.dataset_name,
                               data_args.train_file, data_args.validation_file)
    demo_dir = os.path.join(data_args.demo_dir,
                            f"scenes_{data_args.demo_num_images}_{data_args.demo_max_objects}obj_seed{seed}")
    json_path = os.path.join(demo_dir, "dataset_synthetic.json")
    guard = main_process_first(desc="drawing the synthetic demo collection") if main_process_first else \
        contextlib.nullcontext()
    with guard:
        if not os.path.exists(json_path):
            logger.info("Built-in demo: drawing %d synthetic scenes into %s", data_args.demo_num_images, demo_dir)
            generate_scenes(demo_dir, data_args.demo_num_images, image_size=64, seed=seed,
                            max_objects=data_args.demo_max_objects, heldout_fraction=0.1)
    return load_karpathy(json_path, os.path.join(demo_dir, "images"))


__all__ = ["collection_for"]
