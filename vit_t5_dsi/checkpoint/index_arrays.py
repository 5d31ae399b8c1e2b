"""Compact per-image columns of an image index: keys, identifier token rows (`TokenTable`), strings. No Python
object per image.

At catalogue scale (millions of images) Python lists of strings and token lists cost ~750 bytes per image; these
columns cost what the data does (a 16-character key: 16 bytes plus a 4-byte sort position; an rq id of 4-5 codes:
one byte per code plus its length). Each column also exposes a read-only sequence view, so code written for the
lists (`index.keys[p]`, `for tokens in index.token_ids`, `index.keys == [...]`) keeps working; a view builds
nothing until it is read. Loaded with the rest of the checkpoint code (remote code): imports numpy only.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from .id_trie import lexicographic_order, packed_sort_keys


def smallest_unsigned(span: int) -> np.dtype:
    for dtype in (np.uint8, np.uint16, np.uint32):
        if span <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


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


class TokenTable:
    """Identifier token rows, column by column: column d holds `token - base[d]` in the smallest unsigned dtype
    that fits (one byte per code for rq ids), `lengths` how many columns each row uses. Cells past a row's
    length hold 0 and mean nothing."""

    def __init__(self, columns: list[np.ndarray], bases: list[int], lengths: np.ndarray):
        self.columns, self.bases, self.lengths = columns, [int(b) for b in bases], lengths
        self._order: np.ndarray | None = None
        self._directory: tuple[np.ndarray, list[int]] | None = None  # see `_sampled_keys`

    @classmethod
    def from_table(cls, table: np.ndarray, lengths: np.ndarray) -> "TokenTable":
        """From an (N, width) integer table whose row i uses its first lengths[i] cells."""
        lengths = np.asarray(lengths)
        if len(lengths) and int(lengths.min()) < 1:
            raise ValueError("An identifier has no tokens.")
        columns, bases = [], []
        for d in range(table.shape[1]):
            used = lengths > d
            values = table[used, d].astype(np.int64)
            if len(values) and int(values.min()) < 0:
                raise ValueError("Identifier token ids must be non-negative.")
            base = int(values.min()) if len(values) else 0
            span = int(values.max()) - base if len(values) else 0
            column = np.zeros(len(table), dtype=smallest_unsigned(span))
            column[used] = values - base
            columns.append(column)
            bases.append(base)
        width = int(lengths.max()) if len(lengths) else 0
        return cls(columns, bases, lengths.astype(smallest_unsigned(width)))

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.columns) + self.lengths.nbytes + (
            self._order.nbytes if self._order is not None else 0) + (
            self._directory[0].nbytes if self._directory is not None else 0)

    @property
    def width(self) -> int:
        return len(self.columns)

    def __len__(self) -> int:
        return len(self.lengths)

    def table(self, rows: np.ndarray | None = None, fill: int = -1) -> np.ndarray:
        """(len(rows), width) int64 tokens (all rows by default), `fill` past each row's end."""
        lengths = self.lengths if rows is None else self.lengths[rows]
        out = np.empty((len(lengths), self.width), dtype=np.int64 if rows is not None else np.int32)
        for d, (column, base) in enumerate(zip(self.columns, self.bases)):
            values = column if rows is None else column[rows]
            out[:, d] = np.where(lengths > d, values.astype(np.int64) + base, fill)
        return out

    def row(self, position: int) -> list[int]:
        return [int(column[position]) + base
                for column, base in zip(self.columns[:int(self.lengths[position])], self.bases)]

    def max_token(self) -> int:
        return max(int(column[self.lengths > d].max()) + base if bool((self.lengths > d).any()) else 0
                   for d, (column, base) in enumerate(zip(self.columns, self.bases)))

    def used_tokens(self) -> np.ndarray:
        return np.unique(np.concatenate([column[self.lengths > d].astype(np.int64) + base
                                         for d, (column, base) in enumerate(zip(self.columns, self.bases))]))

    @property
    def order(self) -> np.ndarray:
        """Row positions in lexicographic token order (a shorter row before its extensions)."""
        if self._order is None:
            self._order = lexicographic_order(self.padded_columns()).astype(np.int32)
        return self._order

    def padded_columns(self) -> list[np.ndarray]:
        """The columns as int32 offsets from their bases, -1 past each row's end (the order's sort keys)."""
        return [np.where(self.lengths > d, column.astype(np.int32), np.int32(-1))
                for d, column in enumerate(self.columns)]

    def first_duplicate(self) -> tuple[int, int] | None:
        """Two positions with the same token row, or None."""
        order = self.order
        same = self.lengths[order[1:]] == self.lengths[order[:-1]]
        for column in self.columns:
            same &= column[order[1:]] == column[order[:-1]]
        hit = np.flatnonzero(same)
        return None if not len(hit) else (int(order[hit[0]]), int(order[hit[0] + 1]))

    def find(self, rows: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Position of each query row (tokens `rows[i, :lengths[i]]`), -1 where no identifier has those tokens:
        a lookup in a sample of the sorted keys, then one comparison with the few rows it leaves (ids that pack
        into 63 bits, rq ids among them), else a vectorised binary search over the rows in lexicographic order."""
        queries = np.full((len(rows), self.width), -1, dtype=np.int64)
        fits = (lengths >= 1) & (lengths <= self.width)
        for d in range(self.width):
            inside = fits & (lengths > d)
            value = rows[:, d] - self.bases[d] if d < rows.shape[1] else np.zeros(len(rows), dtype=np.int64)
            fits &= ~inside | ((value >= 0) & (value <= np.iinfo(self.columns[d].dtype).max))  # no such token here
            queries[:, d] = np.where(inside, value, -1)
        sampled = self._sampled_keys()
        if sampled is not None:
            return self._find_in_blocks(queries, fits, *sampled)
        order, n = self.order, len(self)
        lo, hi = np.zeros(len(rows), dtype=np.int64), np.full(len(rows), n, dtype=np.int64)
        for _ in range(int(n).bit_length()):
            searching = lo < hi
            mid = (lo + hi) >> 1
            candidate = self._query_table(order[np.minimum(mid, n - 1)])
            less = _lexicographic_less(candidate, queries)
            lo = np.where(searching & less, mid + 1, lo)
            hi = np.where(searching & ~less, mid, hi)
        position = order[np.minimum(lo, n - 1)].astype(np.int64)
        equal = (lo < n) & fits & (self._query_table(position) == queries).all(1)  # `fits`: a token below a
        # column's base would read as -1, "past the end", and match a shorter id
        return np.where(equal, position, -1)

    DIRECTORY_STRIDE = 16

    def _sampled_keys(self) -> tuple[np.ndarray, list[int]] | None:
        """The packed sort key of every 16th row in lexicographic order and each column's bits, built at the first
        lookup (None past 63 bits): 0.5 byte per id, for one `searchsorted` instead of a 20-step binary search."""
        if self._directory is None and len(self):
            columns = self.padded_columns()
            bits = [int(int(column.max()) + 1).bit_length() for column in columns]
            if sum(bits) <= 63:
                sample = self.order[::self.DIRECTORY_STRIDE]
                self._directory = (packed_sort_keys([column[sample] for column in columns], bits), bits)
        return self._directory

    def _find_in_blocks(self, queries: np.ndarray, fits: np.ndarray, sampled: np.ndarray, bits: list[int]):
        limits = np.asarray([(1 << width) - 2 for width in bits])  # the largest value each column packs
        fits = fits & (queries <= limits).all(1)
        keys = packed_sort_keys(list(np.where(fits[:, None], queries, -1).T), bits)
        first = (np.searchsorted(sampled, keys, side="right") - 1).clip(min=0) * self.DIRECTORY_STRIDE
        ranks = np.minimum(first[:, None] + np.arange(self.DIRECTORY_STRIDE), len(self) - 1)  # (R, stride)
        positions = self.order[ranks].astype(np.int64)
        table = self._query_table(positions.reshape(-1))
        found = packed_sort_keys(list(table.T), bits).reshape(positions.shape) == keys[:, None]
        return np.where(fits & found.any(1), positions[np.arange(len(queries)), found.argmax(1)], -1)

    def _query_table(self, positions: np.ndarray) -> np.ndarray:
        out = np.empty((len(positions), self.width), dtype=np.int64)
        lengths = self.lengths[positions]
        for d, column in enumerate(self.columns):
            out[:, d] = np.where(lengths > d, column[positions].astype(np.int64), -1)
        return out


def _lexicographic_less(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    differ = a != b
    first = differ.argmax(1)
    rows = np.arange(len(a))
    return differ.any(1) & (a[rows, first] < b[rows, first])


class TokenRows(_View):
    """`index.token_ids` as a sequence of lists (built per row when read)."""

    def __init__(self, tokens: TokenTable):
        self._tokens = tokens

    def __len__(self) -> int:
        return len(self._tokens)

    def _item(self, position: int) -> list[int]:
        return self._tokens.row(position)

    def __getitem__(self, position):
        if isinstance(position, slice):
            rows = np.arange(len(self))[position]
            table, lengths = self._tokens.table(rows), self._tokens.lengths[rows]
            return [row[:length] for row, length in zip(table.tolist(), lengths.tolist())]
        return super().__getitem__(position)


class IdStrings(_View):
    """`index.id_strings`, derived from a rule where one holds: the position itself (`template` "{}", naive ids),
    a template of it ("<img_{}>", atomic ids), or the concatenation of the id's tokens' strings (`pieces`: rq
    ids, whose tokens are the code tokens themselves); otherwise stored (`column`)."""

    def __init__(self, count: int, tokens: TokenTable, template: str | None = None,
                 pieces: dict[int, str] | None = None, column: StringColumn | None = None):
        self.count, self._tokens, self.template, self.pieces, self.column = count, tokens, template, pieces, column

    def __len__(self) -> int:
        return self.count

    def _item(self, position: int) -> str:
        if self.template is not None:
            return self.template.format(position)
        if self.pieces is not None:
            return "".join(self.pieces[t] for t in self._tokens.row(position))
        return self.column[position]

    @property
    def nbytes(self) -> int:
        return self.column.nbytes if self.column is not None else 0

    def rule(self) -> dict:
        if self.template is not None:
            return {"template": self.template}
        if self.pieces is not None:
            return {"pieces": {str(token): piece for token, piece in sorted(self.pieces.items())}}
        return {"stored": True}

    @classmethod
    def infer(cls, id_strings: Sequence[str], token_rows: Sequence[Sequence[int]], tokens: TokenTable,
              templates: Sequence[str] = ("{}",), max_pieces: int = 1 << 16) -> "IdStrings":
        """The cheapest rule that reproduces every string exactly (checked on all of them)."""
        id_strings = [str(s) for s in id_strings]
        count = len(id_strings)
        for template in templates:
            if all(s == template.format(i) for i, s in enumerate(id_strings)):
                return cls(count, tokens, template=template)
        pieces = _infer_pieces(id_strings, token_rows, max_pieces)
        if pieces is not None:
            return cls(count, tokens, pieces=pieces)
        return cls(count, tokens, column=StringColumn.from_strings(id_strings))


def _infer_pieces(id_strings: Sequence[str], token_rows, max_pieces: int) -> dict[int, str] | None:
    """token -> string when every id is the concatenation of its tokens' `<...>` pieces (rq code tokens)."""
    import re

    split = re.compile(r"<[^<>]*>")
    pieces: dict[int, str] = {}
    for string, row in zip(id_strings, token_rows):
        if not string.startswith("<"):
            return None
        parts = split.findall(string)
        if len(parts) != len(row) or "".join(parts) != string:
            return None
        for token, part in zip(row, parts):
            if pieces.setdefault(int(token), part) != part:
                return None
        if len(pieces) > max_pieces:
            return None
    return pieces


__all__ = ["KeyColumn", "StringColumn", "smallest_unsigned",
           "TokenTable", "TokenRows", "IdStrings"]
