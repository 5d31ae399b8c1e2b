"""The images of a collection held as bytes (a parquet folder or a Hub dataset: `--dataset_name`), for display.

An index built from such a collection records no image files (`image_files` is None), so every surface's `path` is
None. The app decodes the bytes of the hits it shows instead, from the collection the checkpoint was trained on:
the one named by `--dataset_name`, else the local folder `protocol.json` records as the run's source.
"""

from __future__ import annotations

import json
import logging
import os

from PIL import Image

from ..checkpoint.checkpoint_io import PROTOCOL_FILE  # run_dsi_image.py writes it; its "source" names the collection
from ..checkpoint.image_index_files import checkpoint_file
from ..checkpoint.processing_vit_t5_dsi import load_rgb

logger = logging.getLogger(__name__)



class CollectionImages:
    """`CollectionImages(dataset_name).image(key)`: the decoded image of `key` (None when the collection lacks it)."""

    def __init__(self, dataset_name: str):
        from ..data.collection import load_hub_parquet  # datasets is imported only when a collection is asked for

        self.source = dataset_name
        self._images = load_hub_parquet(dataset_name, require_captions=False).images  # image bytes stay mapped
        self._rows = {key: row for row, key in enumerate(self._images["image_key"][:])}

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: str) -> bool:
        return key in self._rows

    def check_covers(self, keys) -> None:
        """Refuse a collection that holds none of the index's images (another dataset, or another split of it)."""
        keys = list(keys)
        found = sum(key in self._rows for key in keys)
        if found == 0:
            raise ValueError(f"{self.source}: none of the {len(keys)} indexed images (e.g. {keys[:2]}) are in this "
                             f"collection's {len(self)} images.")
        if found < len(keys):
            logger.warning("%s holds %d of the %d indexed images; the others are shown without a picture.",
                           self.source, found, len(keys))

    def image(self, key: str) -> Image.Image | None:
        row = self._rows.get(key)
        return None if row is None else load_rgb(self._images[row]["image"])


def recorded_source(name_or_path: str) -> str | None:
    """The collection the checkpoint's run was trained on (`protocol.json`'s source), or None when not recorded."""
    try:
        path = checkpoint_file(name_or_path, PROTOCOL_FILE)
        if path is None:
            return None
        with open(path, encoding="utf-8") as f:
            source = json.load(f).get("source")
    except (OSError, ValueError, AttributeError):  # offline, unreadable or not the run's protocol file
        return None
    return source if isinstance(source, str) and source else None


def images_for(name_or_path: str, index, dataset_name: str | None = None) -> tuple[CollectionImages | None, str]:
    """The collection images to show for a checkpoint whose index records no files, and a note for the page.

    `dataset_name` when given; else the recorded source when it is a local folder here (a Hub dataset is not
    downloaded unasked: the note names the flag that would)."""
    if index.image_files is not None and dataset_name is None:
        return None, ""
    source = dataset_name or recorded_source(name_or_path)
    if source is None:
        return None, ("The index records no image files (a collection held as image bytes) and no source: start "
                      "the app with `--dataset_name` set to the parquet folder or Hub dataset it was trained on.")
    if dataset_name is None and not os.path.isdir(source):
        return None, (f"The images are held as bytes in `{source}`, the collection this model was trained on: "
                      f"start the app with `--dataset_name {source}` to show them (a Hub dataset is downloaded).")
    images = CollectionImages(source)
    images.check_covers(index.keys)
    return images, ""


__all__ = ["CollectionImages", "recorded_source", "images_for", "PROTOCOL_FILE"]
