"""Imports that only some features need (timm towers, k-means ids).

The import sits in a `try` block on purpose: transformers scans remote-code files for imports and refuses to load
a checkpoint when a module they name is missing, except for imports inside `try`. So a checkpoint saved with
`trust_remote_code` loads without timm or scikit-learn when it does not use them.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def optional_import(module: str, needed_for: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        package = {"sklearn": "scikit-learn"}.get(module.split(".")[0], module.split(".")[0])
        raise ImportError(f"{needed_for} needs {package}: pip install {package}") from err


__all__ = ["optional_import"]
