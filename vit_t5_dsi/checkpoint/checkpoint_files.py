"""What a checkpoint folder holds: the names of its files (one list, read by every writer, cleaner and checker),
and its code: every module of this folder, copied flat beside the weights.

transformers' remote-code loader (`trust_remote_code=True`) imports a checkpoint's modules from its own folder, so
they may import only each other (relative, flat) besides installed libraries. This folder is exactly that set: what
is here is copied into every checkpoint, and nothing here imports from the rest of the package (a test checks
both). Training-only code (identifier building, data, the trainer) lives outside it and never ships."""

from __future__ import annotations

import os
import shutil

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"  # sharded weights
# the image index: the whole index (small collections) or a header naming its columns file
INDEX_FILE_NAME = "image_index.json"
ARRAYS_FILE_PREFIX, ARRAYS_FILE_SUFFIX = "image_index-", ".safetensors"  # per-image columns (larger collections)
EMBEDDINGS_FILE_NAME = "image_embeddings.safetensors"  # the indexed images' dense embeddings (dual encoder)
# rq ids: the frozen codebooks (one (codes, dim) matrix per level, the extra level last), so images added later are
# quantized with the very codes their ids were cut from (`vit_t5_dsi.updates`)
CODEBOOKS_FILE_NAME = "rq_codebooks.safetensors"
# a generative checkpoint's dual encoder (the run's dense stage): ids were cut from it, it re-ranks the beam
DUAL_ENCODER_SUBFOLDER = "dual_encoder"
# what makes a folder a model (not counting the image index's columns files, whose names carry a digest)
MODEL_FILES = (CONFIG_FILE, GENERATION_CONFIG_FILE, WEIGHTS_FILE, WEIGHTS_INDEX_FILE, INDEX_FILE_NAME,
               EMBEDDINGS_FILE_NAME, CODEBOOKS_FILE_NAME)
# a training run's records beside its model (written by the trainer and run_dsi_image.py)
ALL_RESULTS_FILE = "all_results.json"
PROTOCOL_FILE = "protocol.json"
PSEUDO_QUERIES_FILE = "pseudo_queries.jsonl"
UPDATES_FILE = "index_updates.json"  # images added and removed after training (`vit_t5_dsi.updates`), oldest first
RUN_RECORD_FILES = (ALL_RESULTS_FILE, "train_results.json", "eval_results.json", "dense_results.json", PROTOCOL_FILE,
                    "trainer_state.json", PSEUDO_QUERIES_FILE, UPDATES_FILE, "eval_predictions.jsonl",
                    "seen_predictions.jsonl", "index_predictions.jsonl")

CODE_DIRECTORY = os.path.dirname(os.path.abspath(__file__))


def checkpoint_code_files() -> list[str]:
    """The module file names a checkpoint carries (the package marker excluded)."""
    return sorted(name for name in os.listdir(CODE_DIRECTORY) if name.endswith(".py") and name != "__init__.py")


def copy_checkpoint_code(save_directory: str) -> None:
    """Copy every checkpoint module into `save_directory` (transformers copies only the modules that the saved
    classes import; the pipeline and its helpers are not among them)."""
    for name in checkpoint_code_files():
        shutil.copyfile(os.path.join(CODE_DIRECTORY, name), os.path.join(save_directory, name))


__all__ = [name for name in dir() if name.isupper()] + ["checkpoint_code_files", "copy_checkpoint_code"]
