"""Images decoded and resized once, kept as uint8 tensors: later epochs only convert (and augment).

Decoding a PNG or JPEG and resizing it costs far more than a training step of a small model. Training reads every
image hundreds of times, so the collator keeps each image after the image processor's resize step as a uint8
(C, H, W) tensor, a quarter of the memory of the float pixels. Converting it is the processor's own rescale and
normalise, so the pixels are exactly those of a full pass (checked on the first batch; any processor for which
they are not is simply not cached).

The cache lives in the collator of each DataLoader worker, up to `budget_mb` each; images beyond it are decoded
every time, as before. An image whose file changed since it was cached (modification time or size) is decoded
again, so the cache never serves a stale image. A new run, or a new processor, starts with an empty cache.
"""

from __future__ import annotations

import logging
import os

import torch

from ..checkpoint.image_processing import to_rgb

logger = logging.getLogger(__name__)


def file_fingerprint(path: str | None) -> tuple | None:
    """(mtime_ns, size) of an image file; None for images held in the dataset itself (bytes), which cannot
    change under a running job."""
    if path is None:
        return None
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


class DecodedImages:
    """`pixel_values(keys, transform=None)`: the processor's pixels for `keys`, from cached uint8 images."""

    def __init__(self, images, processor, budget_mb: float = 4096):
        self.images, self.processor = images, processor
        self.budget = int(budget_mb * 2 ** 20)
        self.used = 0
        self._cache: dict[str, tuple[torch.Tensor, tuple | None]] = {}
        self.enabled = budget_mb > 0
        self._verified = False
        self.decoded = 0  # images decoded so far (a hit decodes nothing)

    def _load(self, keys) -> list:
        self.decoded += len(keys)
        return [to_rgb(self.images.load(key)) for key in keys]

    def _decode(self, keys) -> list[torch.Tensor]:
        return list(self.processor.image_processor(images=self._load(keys), do_rescale=False, do_normalize=False,
                                                   return_tensors="pt")["pixel_values"])

    def _verify(self, key: str) -> None:
        """Cache only when converting the uint8 image gives exactly the pixels of a full pass."""
        self._verified = True
        if not self.enabled:
            return
        resized = self._decode([key])[0]
        exact = resized.dtype == torch.uint8 and torch.equal(
            self._convert([resized]), self.processor(images=self._load([key]))["pixel_values"])
        if not exact:
            self.enabled = False
            logger.info("Decoded images are not cached: this image processor's resize output is not uint8 pixels "
                        "that convert exactly.")

    def _convert(self, arrays: list[torch.Tensor]) -> torch.Tensor:
        return self.processor.image_processor(images=arrays, do_resize=False, return_tensors="pt")["pixel_values"]

    def uint8(self, keys) -> list[torch.Tensor]:
        """(C, H, W) uint8 tensors after the processor's resize, decoded only when not cached or stale."""
        found: dict[str, torch.Tensor] = {}
        for key in dict.fromkeys(keys):
            entry = self._cache.get(key)
            if entry is not None and entry[1] == file_fingerprint(self.images.path(key)):
                found[key] = entry[0]
        missing = [key for key in dict.fromkeys(keys) if key not in found]
        if missing:
            for key, array in zip(missing, self._decode(missing)):
                found[key] = array
                self._store(key, array)
        return [found[key] for key in keys]

    def _store(self, key: str, array: torch.Tensor) -> None:
        if not self.enabled:
            return
        size = array.numel() * array.element_size()
        previous = self._cache.get(key)
        if previous is not None:
            self.used -= previous[0].numel() * previous[0].element_size()
        if self.used + size <= self.budget:
            self._cache[key] = (array.clone(), file_fingerprint(self.images.path(key)))
            self.used += size
        elif previous is not None:
            del self._cache[key]

    def pixel_values(self, keys, transform=None) -> torch.Tensor:
        """Float pixels for `keys`. `transform` (e.g. a random resized crop to the same size), or a list of one per
        key, acts on each image before conversion: on the uint8 image when cached, on the decoded one otherwise."""
        keys = list(keys)
        transforms = transform if isinstance(transform, (list, tuple)) else [transform] * len(keys)
        if not self._verified and keys:
            self._verify(keys[0])
        if not self.enabled:
            pil = [t(image) if t is not None else image for t, image in zip(transforms, self._load(keys))]
            return self.processor(images=pil)["pixel_values"]
        arrays = [t(array) if t is not None else array for t, array in zip(transforms, self.uint8(keys))]
        return self._convert(arrays)


__all__ = ["DecodedImages", "file_fingerprint"]
