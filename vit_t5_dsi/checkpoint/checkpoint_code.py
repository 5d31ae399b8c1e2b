"""The code a checkpoint carries: every module of this folder, copied flat beside the weights.

transformers' remote-code loader (`trust_remote_code=True`) imports a checkpoint's modules from its own folder, so
they may import only each other (relative, flat) besides installed libraries. This folder is exactly that set: what
is here is copied into every checkpoint, and nothing here imports from the rest of the package (a test checks
both). Training-only code (identifier building, data, the trainer) lives outside it and never ships."""

from __future__ import annotations

import os
import shutil

CODE_DIRECTORY = os.path.dirname(os.path.abspath(__file__))


def checkpoint_code_files() -> list[str]:
    """The module file names a checkpoint carries (the package marker excluded)."""
    return sorted(name for name in os.listdir(CODE_DIRECTORY) if name.endswith(".py") and name != "__init__.py")


def copy_checkpoint_code(save_directory: str) -> None:
    """Copy every checkpoint module into `save_directory` (transformers copies only the modules that the saved
    classes import; the pipeline and its helpers are not among them)."""
    for name in checkpoint_code_files():
        shutil.copyfile(os.path.join(CODE_DIRECTORY, name), os.path.join(save_directory, name))
