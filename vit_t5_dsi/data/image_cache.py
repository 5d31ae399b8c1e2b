"""Images decoded and resized once, kept as uint8 tensors: later epochs only convert (and augment).

Decoding a PNG or JPEG and resizing it costs far more than a training step of a small model. Training reads every
image hundreds of times, so the collator keeps each image after the image processor's resize step as a uint8
(C, H, W) tensor, a quarter of the memory of the float pixels. Converting it is the processor's own rescale and
normalise, so the pixels are exactly those of a full pass (checked on the first batch; any processor for which
they are not is simply not cached).

The cache is one block of shared memory per training process (`SharedImageSlab`), made before any DataLoader
worker starts: every worker reads and fills it, and it outlives the workers Trainer starts anew each epoch, so
later epochs decode nothing whatever `--dataloader_num_workers` is. `budget_mb` bounds the block; images beyond it
are decoded every time. A process that cannot share it (a worker started with `spawn`) keeps a private cache of
the same budget instead. An image whose file changed since it was cached (modification time or size) is decoded
again, so the cache never serves a stale image. A new run, or a new processor, starts with an empty cache.
"""

from __future__ import annotations

import logging
import os

import torch

from ..checkpoint.processing_vit_t5_dsi import to_rgb
from .shared_image_slab import SharedImageSlab

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

    def __init__(self, images, processor, budget_mb: float = 4096, shared: bool = True):
        """`shared`: keep the images in a `SharedImageSlab` (for the first images of the collection that fit
        `budget_mb`); otherwise, or where the slab is detached, in this process's own memory."""
        self.images, self.processor = images, processor
        self.budget = int(budget_mb * 2 ** 20)
        self._used = 0
        self._cache: dict[str, tuple[torch.Tensor, tuple | None]] = {}
        self.enabled = budget_mb > 0
        self._verified = False
        self.decoded = 0  # images decoded so far in this process (a hit decodes nothing)
        self.slab = None
        size = getattr(processor, "image_size", None)
        positions = getattr(images, "position", None)  # key -> slot: the collection's order
        if self.enabled and shared and positions is not None and isinstance(size, int):
            shape = (3, size, size)
            capacity = min(len(positions), self.budget // (3 * size * size))
            self.slab = SharedImageSlab(capacity, shape)

    @property
    def used(self) -> int:
        """Bytes of decoded images held (in the shared block, or in this process)."""
        return self.slab.filled() * self.slab.image_bytes if self._shared else self._used

    @property
    def _shared(self) -> bool:
        return self.slab is not None and self.slab.attached

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
        if self._shared and self.slab.verdict:  # another worker has checked already
            self.enabled = self.slab.verdict == 1
            return
        resized = self._decode([key])[0]
        exact = resized.dtype == torch.uint8 and torch.equal(
            self._convert([resized]), self.processor(images=self._load([key]))["pixel_values"])
        if self._shared:
            self.slab.verdict = 1 if exact else 2
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
            if self._shared:
                stored = self.slab.get(self.images.position[key], file_fingerprint(self.images.path(key)))
                if stored is not None:  # a copy: the block is shared, and transforms must never write into it
                    found[key] = torch.from_numpy(stored.copy())
                continue
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
        if self._shared:  # images beyond the block's capacity (the budget) are not kept anywhere else
            if array.dtype == torch.uint8:
                self.slab.put(self.images.position[key], array.numpy(), file_fingerprint(self.images.path(key)))
            return
        size = array.numel() * array.element_size()
        previous = self._cache.get(key)
        if previous is not None:
            self._used -= previous[0].numel() * previous[0].element_size()
        if self._used + size <= self.budget:
            self._cache[key] = (array.clone(), file_fingerprint(self.images.path(key)))
            self._used += size
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
