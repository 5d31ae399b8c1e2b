"""Evaluation queries from a file, checked against a trained checkpoint's image index.

`run_dsi_image.py --model_name_or_path CKPT --do_train False --validation_file queries.jsonl` evaluates new
queries without re-declaring the collection: the checkpoint already knows its images, so a query only names the
image it should find. The rows are the prototype JSONL's caption rows, `{"image_id": ..., "caption": ...}`
(`image_key`, the search surfaces' name, is accepted too).
"""

from __future__ import annotations

import datasets
import numpy as np

from ..checkpoint.checkpoint_io import CollectionError
from .collection import _check_caption, _read_jsonl
from .rows import RETRIEVAL, _rows

KEY_FIELDS = ("image_id", "image_key")


def load_query_file(path: str, index) -> datasets.Dataset:
    """Evaluation rows (caption -> gold image) for `index` (an `ImageIndex`). Every error names the file and line:
    a row that is not an object, a missing or empty caption, no key, or a key the index does not hold."""
    keys, captions, lines = [], [], []
    for number, row in _read_jsonl(path):
        where = f"{path}:{number}"
        if not isinstance(row, dict):
            raise CollectionError(f"{where}: a row is a JSON object with 'image_id' and 'caption'.")
        field = next((name for name in KEY_FIELDS if name in row), None)
        if field is None:
            raise CollectionError(f"{where}: row has no 'image_id' (or 'image_key'): the image the query should find.")
        if "caption" not in row:
            raise CollectionError(f"{where}: row for image {row[field]!r} has no 'caption'.")
        _check_caption(where, f"image {row[field]!r}", 0, row["caption"])
        keys.append(str(row[field]))
        captions.append(" ".join(row["caption"].split()))
        lines.append(number)
    if not keys:
        raise CollectionError(f"{path}: no queries in the file.")
    unknown = np.flatnonzero(index.positions_of(keys) < 0)
    if len(unknown):
        first = unknown[0]
        raise CollectionError(f"{path}:{lines[first]}: image {keys[first]!r} is not in the checkpoint's index "
                              f"({len(unknown)} of {len(keys)} queries name images it does not hold; a checkpoint "
                              "finds only the images it indexed: add them with update_index.py).")
    return _rows(keys, captions, RETRIEVAL, True)


__all__ = ["load_query_file", "KEY_FIELDS"]
