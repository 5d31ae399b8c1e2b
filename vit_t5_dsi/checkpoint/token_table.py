"""Identifier token rows of an image index, packed: one table of small integers and the id strings they spell.

An rq id of 4-5 codes costs one byte per code plus its length, instead of a Python list per image. Views keep the
list-of-lists interface (`index.token_ids[p]`) without building it. Loaded with the checkpoint code: numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .index_arrays import StringColumn, _View, lexicographic_order, smallest_unsigned


class TokenTable:
    """Identifier token rows, column by column: column d holds `token - base[d]` in the smallest unsigned dtype
    that fits (one byte per code for rq ids), `lengths` how many columns each row uses. Cells past a row's
    length hold 0 and mean nothing."""

    def __init__(self, columns: list[np.ndarray], bases: list[int], lengths: np.ndarray):
        self.columns, self.bases, self.lengths = columns, [int(b) for b in bases], lengths
        self._order: np.ndarray | None = None

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
            self._order.nbytes if self._order is not None else 0)

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
        a vectorised binary search over the rows in lexicographic order."""
        queries = np.full((len(rows), self.width), -1, dtype=np.int64)
        fits = (lengths >= 1) & (lengths <= self.width)
        for d in range(self.width):
            inside = fits & (lengths > d)
            value = rows[:, d] - self.bases[d] if d < rows.shape[1] else np.zeros(len(rows), dtype=np.int64)
            fits &= ~inside | ((value >= 0) & (value <= np.iinfo(self.columns[d].dtype).max))  # no such token here
            queries[:, d] = np.where(inside, value, -1)
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


__all__ = ["TokenTable", "TokenRows", "IdStrings"]
