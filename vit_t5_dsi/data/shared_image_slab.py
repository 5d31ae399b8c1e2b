"""One block of shared memory for decoded images: every DataLoader worker of a training process reads and fills
the same slots, and the block outlives the workers, so an image decoded in epoch 1 by any worker is converted
without decoding in every later epoch by every worker.

Trainer starts new DataLoader workers every epoch (unless `--dataloader_persistent_workers`, which would freeze
the collator's per-epoch state in the workers); a cache held in each worker's memory therefore started empty every
epoch, and its budget was per worker. Here the training process maps an anonymous shared block (`mmap` with
`MAP_SHARED`) before any worker starts. Workers are forked (the Linux default) and inherit the mapping, so their
writes land in the parent's block: no file, nothing to clean up after a crash, and pages are only allocated when
an image is stored. A process that did not inherit the block (a worker started with `spawn`) sees it detached and
the caller keeps a private cache instead.

Slot `i` holds the image at position `i` of the collection, for the first `capacity` positions (the budget).
A slot is written pixels first, then the source file's fingerprint, then its `filled` mark, so a reader that
sees the mark sees the pixels. Two workers decoding the same image write the same bytes.
"""

from __future__ import annotations

import mmap

import numpy as np

NO_FINGERPRINT = -1  # the image is held in the dataset itself (bytes): it cannot change under a running job


class SharedImageSlab:
    """`capacity` uint8 images of `shape` (C, H, W) in shared memory, each with a (filled, mtime_ns, size) record."""

    def __init__(self, capacity: int, shape: tuple[int, ...]):
        self.capacity, self.shape = int(capacity), tuple(shape)
        self.image_bytes = int(np.prod(self.shape))
        # anonymous + shared: inherited by forked workers, freed with the last process that maps it
        # one record per slot, after a first one that holds the shared verdict (see `verdict`)
        self._records_map = mmap.mmap(-1, (self.capacity + 1) * 3 * 8, flags=mmap.MAP_SHARED)
        self._pixels_map = mmap.mmap(-1, max(1, self.capacity * self.image_bytes), flags=mmap.MAP_SHARED)
        self._views()

    def _views(self) -> None:
        table = np.frombuffer(self._records_map, dtype=np.int64).reshape(self.capacity + 1, 3)
        self._header, self.records = table[0], table[1:]
        self.pixels = np.frombuffer(self._pixels_map, dtype=np.uint8)[: self.capacity * self.image_bytes].reshape(
            (self.capacity, *self.shape))

    @property
    def attached(self) -> bool:
        return self._pixels_map is not None

    @property
    def nbytes(self) -> int:
        return self.capacity * (self.image_bytes + 24)

    def __getstate__(self):  # a spawned process cannot share the block: it gets a detached slab
        return {"capacity": self.capacity, "shape": self.shape, "image_bytes": self.image_bytes}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._records_map = self._pixels_map = self.records = self.pixels = self._header = None

    @property
    def verdict(self) -> int:
        """What the first process to check found (0 = not checked yet, 1 = the images can be cached, 2 = not):
        the check decodes an image twice, so workers started later read the verdict instead."""
        return int(self._header[0]) if self.attached else 0

    @verdict.setter
    def verdict(self, value: int) -> None:
        if self.attached:
            self._header[0] = value

    def get(self, slot: int, fingerprint: tuple | None) -> np.ndarray | None:
        """The stored image of `slot` (a view), or None when it is empty or was stored from another version of
        its file."""
        if not self.attached or not 0 <= slot < self.capacity:
            return None
        filled, mtime, size = self.records[slot].tolist()
        if not filled or (mtime, size) != _record(fingerprint):
            return None
        return self.pixels[slot]

    def put(self, slot: int, image: np.ndarray, fingerprint: tuple | None) -> bool:
        """Store `image` in `slot` when the slot exists and the shape fits; returns whether it was stored."""
        if not self.attached or not 0 <= slot < self.capacity or tuple(image.shape) != self.shape:
            return False
        self.records[slot, 0] = 0
        self.pixels[slot] = image
        self.records[slot, 1:] = _record(fingerprint)
        self.records[slot, 0] = 1
        return True

    def filled(self) -> int:
        return int(self.records[:, 0].sum()) if self.attached else 0


def _record(fingerprint: tuple | None) -> tuple[int, int]:
    return (NO_FINGERPRINT, NO_FINGERPRINT) if fingerprint is None else (int(fingerprint[0]), int(fingerprint[1]))


__all__ = ["SharedImageSlab"]
