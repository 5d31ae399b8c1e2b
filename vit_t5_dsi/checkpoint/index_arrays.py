"""Compact per-image columns of an image index: keys, identifier token rows, strings. No Python object per image.

At catalogue scale (millions of images) Python lists of strings and token lists cost ~750 bytes per image; these
columns cost what the data does (a 16-character key: 16 bytes plus a 4-byte sort position; an rq id of 4-5 codes:
one byte per code plus its length). Each column also exposes a read-only sequence view, so code written for the
lists (`index.keys[p]`, `for tokens in index.token_ids`, `index.keys == [...]`) keeps working; a view builds
nothing until it is read. Loaded with the rest of the checkpoint code (remote code): imports numpy only.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np


def smallest_unsigned(span: int) -> np.dtype:
    for dtype in (np.uint8, np.uint16, np.uint32):
        if span <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def _packed_keys(columns: Sequence[np.ndarray]) -> np.ndarray | None:
    """One int64 per row that sorts as the rows do (columns of integers >= -1), or None when they need more than
    63 bits."""
    bits = [int(int(column.max()) + 1).bit_length() if len(column) else 1 for column in columns]
    if sum(bits) > 63:
        return None
    key = np.zeros(len(columns[0]) if columns else 0, dtype=np.int64)
    for column, width in zip(columns, bits):
        key <<= width
        key |= column.astype(np.int64) + 1
    return key


def lexicographic_order(columns: Sequence[np.ndarray]) -> np.ndarray:
    """Stable order of rows given column by column (integers >= -1, -1 past a row's end, so a shorter row sorts
    before its extensions). Packs the columns into one int64 key and argsorts it when they fit in 63 bits (ids
    of a few small codes: several times faster than `np.lexsort`), else `np.lexsort`."""
    key = _packed_keys(columns)
    if key is None:
        return np.lexsort(list(columns)[::-1])
    return np.argsort(key, kind="stable")


def check_row_order(columns: Sequence[np.ndarray], order: np.ndarray, source: str) -> None:
    """`order` is a permutation that sorts the rows strictly (so rows are also distinct); a ValueError if not."""
    n = len(order)
    if n and (int(order.min()) < 0 or int(order.max()) >= n):
        raise ValueError(f"{source}: the identifier order is not a permutation of the images.")
    seen = np.zeros(n, dtype=bool)
    seen[order] = True
    if not bool(seen.all()):
        raise ValueError(f"{source}: the identifier order is not a permutation of the images.")
    key = _packed_keys(columns)
    if key is not None:
        ordered = key[order]
        increasing = bool((ordered[1:] > ordered[:-1]).all())
    else:
        less = np.zeros(max(n - 1, 0), dtype=bool)
        decided = np.zeros(max(n - 1, 0), dtype=bool)
        for column in columns:
            a, b = column[order[:-1]], column[order[1:]]
            less |= ~decided & (a < b)
            decided |= a != b
        increasing = bool(less.all())
    if not increasing:
        raise ValueError(f"{source}: two images share identifier tokens, or the identifier order is not sorted.")


class _View(Sequence):
    """A read-only sequence that compares equal to any sequence with the same items (lists included)."""

    def _item(self, position: int):
        raise NotImplementedError

    def __getitem__(self, position):
        if isinstance(position, slice):
            return [self._item(i) for i in range(*position.indices(len(self)))]
        position = int(position)
        if position < 0:
            position += len(self)
        if not 0 <= position < len(self):
            raise IndexError(f"position {position} out of range for {len(self)} images")
        return self._item(position)

    def __iter__(self) -> Iterator:
        for start in range(0, len(self), 65536):
            yield from self[start:start + 65536]

    def __eq__(self, other) -> bool:
        if isinstance(other, (str, bytes)) or not isinstance(other, Iterable):
            return NotImplemented
        other = list(other)
        return len(other) == len(self) and all(a == b for a, b in zip(self, other))

    def __ne__(self, other) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    __hash__ = None

    def __repr__(self) -> str:
        head = ", ".join(repr(item) for item in self[:3])
        return f"{type(self).__name__}([{head}{', ...' if len(self) > 3 else ''}], {len(self)} images)"


class KeyColumn(_View):
    """Image keys as one fixed-width bytes array (UTF-8, in position order) plus the permutation that sorts it:
    position -> key is one slice, key -> position one `np.searchsorted`. Keys are distinct and hold no NUL."""

    def __init__(self, values: np.ndarray, order: np.ndarray | None = None):
        self.values = values
        self.order = np.argsort(values, kind="stable").astype(np.int32) if order is None else order

    @classmethod
    def from_strings(cls, keys: Sequence[str]) -> "KeyColumn":
        encoded = [str(key).encode("utf-8") for key in keys]
        if any(b"\x00" in key for key in encoded):
            raise ValueError("An image key contains a NUL character.")
        values = np.array(encoded, dtype=f"S{max(1, max(map(len, encoded), default=1))}")
        column = cls(values)
        column.check_distinct()
        return column

    def check_distinct(self, source: str = "the image index") -> None:
        ordered = self.values[self.order]
        same = np.flatnonzero(ordered[1:] == ordered[:-1])
        if len(same):
            raise ValueError(f"Duplicate image key {ordered[same[0]].decode('utf-8')!r} in {source}.")

    def check_sorted(self, source: str) -> None:
        if len(self.order) != len(self.values) or (len(self.order) and (
                int(self.order.min()) < 0 or int(self.order.max()) >= len(self.values))):
            raise ValueError(f"{source}: the key order does not match the keys.")
        ordered = self.values[self.order]
        if not bool((ordered[1:] > ordered[:-1]).all()):
            raise ValueError(f"{source}: the image keys are not distinct or their order is not sorted.")

    def __len__(self) -> int:
        return len(self.values)

    def _item(self, position: int) -> str:
        return self.values[position].decode("utf-8")

    def __getitem__(self, position):
        if isinstance(position, slice):
            return [key.decode("utf-8") for key in self.values[position].tolist()]
        return super().__getitem__(position)

    def __eq__(self, other) -> bool:
        if isinstance(other, KeyColumn):
            return len(self) == len(other) and bool((self.values == other.values).all())
        return super().__eq__(other)

    def __contains__(self, key) -> bool:
        return isinstance(key, str) and self.position(key) >= 0

    def positions(self, keys) -> np.ndarray:
        """Position of each key (-1 where it is not indexed), vectorised."""
        if isinstance(keys, KeyColumn):
            queries = keys.values
        else:
            queries = np.array([str(key).encode("utf-8") for key in keys], dtype=bytes)
        if len(self) == 0 or len(queries) == 0:
            return np.full(len(queries), -1, dtype=np.int64)
        slot = np.searchsorted(self.values, queries, sorter=self.order).clip(max=len(self) - 1)
        found = self.order[slot].astype(np.int64)
        return np.where(self.values[found] == queries, found, -1)

    def position(self, key: str) -> int:
        return int(self.positions([key])[0])


class KeyPositions(Mapping):
    """key -> position, answered by the key column (no per-image dict)."""

    def __init__(self, keys: KeyColumn):
        self._keys = keys

    def __getitem__(self, key) -> int:
        position = self._keys.position(str(key))
        if position < 0:
            raise KeyError(key)
        return position

    def __contains__(self, key) -> bool:
        return self._keys.position(str(key)) >= 0

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class StringColumn(_View):
    """Variable-length strings (or None) as one UTF-8 byte buffer and N + 1 offsets."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray, present: np.ndarray | None = None):
        self.data, self.offsets, self.present = data, offsets, present

    @classmethod
    def from_strings(cls, strings: Sequence[str | None]) -> "StringColumn":
        encoded = [b"" if s is None else str(s).encode("utf-8") for s in strings]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)), out=offsets[1:])
        data = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
        present = None if all(s is not None for s in strings) else np.array([s is not None for s in strings])
        return cls(data, offsets, present)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.offsets.nbytes + (self.present.nbytes if self.present is not None else 0)

    def check(self, count: int, source: str) -> None:
        if (len(self.offsets) != count + 1 or int(self.offsets[0]) != 0 or int(self.offsets[-1]) != len(self.data)
                or bool((np.diff(self.offsets) < 0).any())
                or (self.present is not None and len(self.present) != count)):
            raise ValueError(f"{source}: a string column does not hold one entry per image.")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def _item(self, position: int) -> str | None:
        if self.present is not None and not self.present[position]:
            return None
        return self.data[self.offsets[position]:self.offsets[position + 1]].tobytes().decode("utf-8")


__all__ = ["lexicographic_order", "check_row_order", "KeyColumn", "KeyPositions", "StringColumn", "smallest_unsigned"]
