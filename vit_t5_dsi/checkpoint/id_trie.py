"""A trie over identifier token sequences, held in packed arrays, and the beam-search constraint built on it.

Public trie decoders (GENRE and its descendants) walk a nested dict once per beam per step from Python; a dict
trie also costs hundreds of bytes per identifier. Here the trie is a level-order (LOUDS-like) CSR: nodes are
numbered breadth first with every node's children sorted by token, so the node behind edge `e` is simply `e + 1`
and the trie is three flat arrays: `edge_start` (first edge of each node), `edge_token` (the token of each edge)
and a bitmap of the nodes where an identifier ends. At 1M rq ids that is ~12 bytes per id. It is built with a
handful of numpy passes over a padded (N, max_len) token table: one lexicographic sort, then one pass per depth.
Each decoding step moves every beam one token down with a vectorised binary search over its node's children
(no Python loop over beams), and one scatter builds the mask.

`IdTrie.candidate_table` gives each beam's allowed tokens as one padded table, for the trie beam search
(`ranking.trie_beam_search`); `TrieConstrainedLogitsProcessor` constrains `model.generate`. The lexicographic
order of token rows (`lexicographic_order`, `packed_sort_keys`) is the trie's build order, and the image index's
order for decoding ids back to images.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch
from transformers import LogitsProcessor



def packed_sort_keys(columns: Sequence[np.ndarray], bits: Sequence[int] | None = None) -> np.ndarray | None:
    """One int64 per row that sorts as the rows do (columns of integers >= -1), or None when they need more than
    63 bits. `bits`: each column's width, when keys must be comparable with keys packed from other rows."""
    if bits is None:
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
    key = packed_sort_keys(columns)
    if key is None:
        return np.lexsort(list(columns)[::-1])
    return np.argsort(key, kind="stable")


def padded_token_table(sequences: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(N, max_len) int32 table (-1 after each row's end) and the (N,) lengths of a list of token lists."""
    lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences))
    width = int(lengths.max()) if len(lengths) else 0
    flat = np.fromiter(itertools.chain.from_iterable(sequences), dtype=np.int64, count=int(lengths.sum()))
    if len(flat) and (int(flat.min()) < 0 or int(flat.max()) >= 2 ** 31):
        raise ValueError("Identifier token ids must be non-negative (and below 2**31).")
    table = np.full((len(lengths), width), -1, dtype=np.int32)
    table[np.arange(width)[None, :] < lengths[:, None]] = flat  # row-major: each row gets its tokens
    return table, lengths


def _column_reader(columns: Sequence[np.ndarray], bases: Sequence[int] | None = None):
    """`read(d, rows=None)`: the d-th tokens (`columns[d] + bases[d]`) of all rows, or of `rows`."""
    bases = [0] * len(columns) if bases is None else [int(b) for b in bases]

    def read(depth: int, rows: np.ndarray | None = None) -> np.ndarray:
        values = columns[depth] if rows is None else columns[depth][rows]
        values = values.astype(np.int64 if bases[depth] or values.dtype.itemsize > 4 else np.int32)
        return values + bases[depth] if bases[depth] else values

    return read


class IdTrie:
    """Prefix tree of token sequences; after a complete sequence only `eos`, after eos only `pad`/`eos`.

    Nodes are integers in breadth-first order: the root is 0, node `edge_start[n] + i + 1` is node n's i-th child
    (children sorted by token), `edge_token[e]` is the token leading to node `e + 1`, and bit n of `terminal`
    says that an identifier ends at node n (eos allowed there). -1 stands for "no node": after eos, or off the
    trie; it allows only pad and eos, so beam search never gets an empty choice.
    """

    ROOT, DEAD = 0, -1

    def __init__(self, sequences: Sequence[Sequence[int]], eos_token_id: int, pad_token_id: int):
        if len(sequences) == 0:
            raise ValueError("Cannot build an identifier trie from zero identifiers.")
        table, lengths = padded_token_table(sequences)
        self._build(_column_reader([table[:, d] for d in range(table.shape[1])]), table.shape[1], lengths,
                    eos_token_id, pad_token_id)

    @classmethod
    def from_table(cls, table: np.ndarray, lengths: np.ndarray | None, eos_token_id: int, pad_token_id: int,
                   order: np.ndarray | None = None) -> "IdTrie":
        """From an (N, max_len) integer table; row i's tokens are `table[i, :lengths[i]]` (without lengths: up to
        its first negative entry). Cells past a row's length are ignored. `order`, when the caller has it, is the
        rows' lexicographic order (a shorter row before its extensions), which saves the build its one sort."""
        table = np.asarray(table)
        if table.ndim != 2 or len(table) == 0:
            raise ValueError("Cannot build an identifier trie from zero identifiers.")
        if lengths is None:
            negative = table < 0
            lengths = np.where(negative.any(1), negative.argmax(1), table.shape[1])
        return cls.from_columns([table[:, d] for d in range(table.shape[1])], lengths, eos_token_id, pad_token_id,
                                order)

    @classmethod
    def from_columns(cls, columns: Sequence[np.ndarray], lengths: np.ndarray, eos_token_id: int, pad_token_id: int,
                     order: np.ndarray | None = None, bases: Sequence[int] | None = None) -> "IdTrie":
        """From the token table given column by column: row i's d-th token is `columns[d][i] + bases[d]` (bases
        default to 0) for d < lengths[i]. Columns may be narrow unsigned arrays (an index's `TokenTable`): no
        (N, max_len) table is ever built."""
        if len(columns) == 0 or len(columns[0]) == 0:
            raise ValueError("Cannot build an identifier trie from zero identifiers.")
        trie = cls.__new__(cls)
        trie._build(_column_reader(columns, bases), len(columns), np.asarray(lengths), eos_token_id, pad_token_id,
                    order)
        return trie

    def _build(self, column, width: int, lengths: np.ndarray, eos_token_id: int, pad_token_id: int,
               order: np.ndarray | None = None) -> None:
        """One pass per depth over the rows in lexicographic order: the first row of each distinct prefix of
        length d + 1 is a new node at depth d + 1, numbered in that order, which is breadth-first order.
        `column(d, rows=None)` gives the d-th tokens of all rows (or of `rows`), meaningless past a row's end."""
        self.eos_token_id, self.pad_token_id = int(eos_token_id), int(pad_token_id)
        n = len(lengths)
        if int(lengths.min()) <= 0:
            raise ValueError("An identifier has no tokens.")
        if int(lengths.max()) > width:
            raise ValueError("An identifier is longer than the token table.")
        max_token = 0
        for depth in range(width):  # column by column: no copy of the whole table
            values = column(depth, np.flatnonzero(lengths > depth))
            if len(values) == 0:  # a column no id reaches (a table wider than its longest id)
                continue
            if int(values.min()) < 0:
                raise ValueError("Identifier token ids must be non-negative.")
            if int(values.max()) >= 2 ** 31:
                raise ValueError("Identifier token ids must be below 2**31.")
            if bool((values == self.eos_token_id).any()):
                raise ValueError("An identifier contains the eos token; eos may only end it.")
            max_token = max(max_token, int(values.max()))
            del values
        self.max_length = width + 1  # + eos
        if order is None:  # rows sharing a prefix become contiguous, a shorter row before its extensions
            order = lexicographic_order([np.where(lengths > d, column(d), -1).astype(np.int32)
                                         for d in range(width)])
        index_dtype = np.int32 if int(lengths.sum()) < 2 ** 31 - 1 else np.int64  # nodes <= 1 + all tokens
        token_dtype = np.uint16 if max_token < 2 ** 16 else np.int32
        sorted_lengths = lengths[order].astype(np.int32)
        edge_tokens, child_counts, ends = [], [], [np.zeros(1, dtype=bool)]  # the root: no id ends there
        changed = np.zeros(n, dtype=bool)  # whether a row's prefix so far differs from the previous row's
        changed[0] = True
        node = np.zeros(n, dtype=index_dtype)  # each row's node at the current depth
        level_start, level_size, next_node = 0, 1, 1  # depth 0: the root alone
        for depth in range(width):
            tokens = column(depth, order).astype(np.int32, copy=False)
            active = sorted_lengths > depth
            tokens[~active] = -1
            changed[1:] |= tokens[1:] != tokens[:-1]
            new = changed & active  # the first row of each distinct prefix of length depth + 1: a new node
            child_counts.append(np.bincount(node[new] - level_start, minlength=level_size).astype(index_dtype))
            edge_tokens.append(tokens[new].astype(token_dtype))
            del tokens
            numbers = np.cumsum(new, dtype=index_dtype)
            numbers += next_node - 1
            np.copyto(node, numbers, where=active)
            del numbers, new
            level_start, level_size = next_node, len(edge_tokens[-1])
            next_node += level_size
            level_ends = np.zeros(level_size, dtype=bool)
            level_ends[node[sorted_lengths == depth + 1] - level_start] = True
            ends.append(level_ends)
        del order, sorted_lengths, changed, node, active
        child_counts.append(np.zeros(level_size, dtype=index_dtype))  # the deepest nodes have no children
        self.num_nodes = next_node
        counts = np.concatenate([np.zeros(1, dtype=index_dtype)] + child_counts)
        del child_counts
        self.edge_start = np.cumsum(counts, dtype=index_dtype)  # (num_nodes + 1,): node n's edges, CSR
        del counts
        self.edge_token = np.concatenate(edge_tokens)  # (num_nodes - 1,): edge e leads to node e + 1
        del edge_tokens
        self.terminal = np.packbits(np.concatenate(ends), bitorder="little")
        self.max_fanout = int(np.diff(self.edge_start).max())

    # ----- reading the trie ------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes held by the trie's arrays."""
        return self.edge_start.nbytes + self.edge_token.nbytes + self.terminal.nbytes

    def ends_at(self, nodes: np.ndarray) -> np.ndarray:
        """Whether an identifier ends at each node (False for -1)."""
        nodes = np.asarray(nodes, dtype=np.int64)
        safe = nodes.clip(min=0)
        return ((self.terminal[safe >> 3] >> (safe & 7)) & 1).astype(bool) & (nodes >= 0)

    def step(self, nodes: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Child of each node through each token; -1 where there is none (eos, off the trie, or already -1)."""
        nodes = np.asarray(nodes, dtype=np.int64)
        tokens = np.asarray(tokens, dtype=np.int64)
        safe = nodes.clip(min=0)
        lo = self.edge_start[safe].astype(np.int64)
        end = np.where(nodes >= 0, self.edge_start[safe + 1], lo).astype(np.int64)
        hi = end.copy()
        last = len(self.edge_token) - 1
        width = int((hi - lo).max()) if len(nodes) else 0
        for _ in range(int(width).bit_length()):  # binary search among each node's sorted children, all at once
            mid = (lo + hi) >> 1
            less = self.edge_token[np.minimum(mid, last)] < tokens
            searching = lo < hi
            lo = np.where(searching & less, mid + 1, lo)
            hi = np.where(searching & ~less, mid, hi)
        found = (lo < end) & (self.edge_token[np.minimum(lo, last)] == tokens)
        return np.where(found, lo + 1, -1)

    def walk(self, prefixes: np.ndarray) -> np.ndarray:
        """Node reached by each row of a (R, L) prefix table (generated tokens only, no start token)."""
        prefixes = np.asarray(prefixes, dtype=np.int64).reshape(len(prefixes), -1)
        nodes = np.zeros(len(prefixes), dtype=np.int64)
        for column in prefixes.T:
            nodes = self.step(nodes, column)
        return nodes

    def allowed_tokens(self, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, token) pairs allowed after each node: its children, eos where an id ends, pad/eos after -1."""
        nodes = np.asarray(nodes, dtype=np.int64)
        safe = nodes.clip(min=0)
        starts = self.edge_start[safe].astype(np.int64)
        counts = np.where(nodes >= 0, self.edge_start[safe + 1] - starts, 0)
        rows = np.repeat(np.arange(len(nodes)), counts)
        offsets = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
        tokens = self.edge_token[starts[rows] + offsets].astype(np.int64)
        ends = np.flatnonzero(self.ends_at(nodes))
        dead = np.flatnonzero(nodes < 0)
        if len(ends) or len(dead):
            rows = np.concatenate([rows, ends, np.repeat(dead, 2)])
            tokens = np.concatenate([tokens, np.full(len(ends), self.eos_token_id),
                                     np.tile([self.pad_token_id, self.eos_token_id], len(dead))])
        return rows, tokens

    def mask_scores(self, nodes: np.ndarray, scores: torch.Tensor) -> torch.Tensor:
        """`scores` with every token that does not continue an identifier set to -inf (one scatter). Tokens the
        model cannot write (ids beyond its vocabulary) are never allowed."""
        rows, tokens = self.allowed_tokens(nodes)
        keep = tokens < scores.shape[-1]
        rows = torch.from_numpy(rows[keep]).to(scores.device, non_blocking=True)
        tokens = torch.from_numpy(tokens[keep]).to(scores.device, non_blocking=True)
        constrained = torch.full_like(scores, float("-inf"))
        constrained[rows, tokens] = scores[rows, tokens]
        return constrained

    def candidate_table(self, nodes: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per beam, its allowed tokens (R, F), whether each slot holds one (R, F), and the node each leads to (-1 for
        eos). F is the widest node among these beams, + 1 for eos; tokens beyond the model's vocabulary never count."""
        safe = nodes.clip(min=0)
        starts = self.edge_start[safe].astype(np.int64)
        counts = np.where(nodes >= 0, self.edge_start[safe + 1] - starts, 0)
        width = int(counts.max()) if len(counts) else 0
        slot = np.arange(width)
        edge = np.minimum(starts[:, None] + slot, max(len(self.edge_token) - 1, 0))
        tokens = self.edge_token[edge].astype(np.int64) if len(self.edge_token) else np.zeros_like(edge)
        valid = slot < counts[:, None]
        children = edge + 1
        ends = self.ends_at(nodes)
        tokens = np.concatenate([tokens, np.full((len(nodes), 1), self.eos_token_id)], axis=1)
        valid = np.concatenate([valid, ends[:, None]], axis=1) & (tokens < vocab_size)
        children = np.concatenate([children, np.full((len(nodes), 1), -1)], axis=1)
        return np.where(valid, tokens, 0), valid, children

    def children(self, prefix: Sequence[int]) -> list[int]:
        return self.allowed_tokens(self.walk(np.asarray([list(prefix)], dtype=np.int64)))[1].tolist()


class TrieConstrainedLogitsProcessor(LogitsProcessor):
    """Masks every beam's scores to the tokens that continue an existing identifier.

    `input_ids` are the decoder's tokens so far; their first column (the decoder start token) is skipped. Beam
    search reorders rows between steps without telling processors, so each call finds every row's parent among
    the previous call's rows (hash, then an exact check) and moves one token down the trie; when that fails (a
    new generation, or anything unexpected) it walks the whole prefix from the root. No loop over beams.
    """

    def __init__(self, trie: IdTrie, num_start_tokens: int = 1):
        self.trie = trie
        self.num_start_tokens = num_start_tokens
        self._previous: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # ids, their hashes, nodes
        self._weights = np.random.default_rng(0).integers(1, 2 ** 61, size=64, dtype=np.int64)

    def _hash(self, rows: np.ndarray) -> np.ndarray:
        if len(self._weights) < rows.shape[1]:
            self._weights = np.random.default_rng(rows.shape[1]).integers(1, 2 ** 61, size=2 * rows.shape[1],
                                                                           dtype=np.int64)
        with np.errstate(over="ignore"):  # wrap-around arithmetic is the hash
            return (rows * self._weights[: rows.shape[1]]).sum(1)

    def _nodes(self, input_ids: np.ndarray) -> np.ndarray:
        generated = input_ids[:, self.num_start_tokens:]
        if self._previous is not None and generated.shape[1] >= 1:
            previous_ids, previous_hashes, previous_nodes = self._previous
            prefix = input_ids[:, :-1]
            if previous_ids.shape == prefix.shape:
                parent = (self._hash(prefix)[:, None] == previous_hashes[None, :]).argmax(1)
                if (previous_ids[parent] == prefix).all():
                    return self.trie.step(previous_nodes[parent], input_ids[:, -1])
        return self.trie.walk(generated)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        ids = input_ids.detach().cpu().numpy().astype(np.int64, copy=False)
        nodes = self._nodes(ids)
        self._previous = (ids, self._hash(ids), nodes)
        return self.trie.mask_scores(nodes, scores)


def prefix_allowed_tokens_fn(trie: IdTrie, num_start_tokens: int = 1):
    """The same constraint for `generate(prefix_allowed_tokens_fn=...)` users (one Python call per beam)."""

    def allowed(batch_id: int, sent: torch.Tensor) -> list[int]:
        return trie.children(sent[num_start_tokens:].tolist())

    return allowed


__all__ = ["IdTrie", "lexicographic_order", "packed_sort_keys", "TrieConstrainedLogitsProcessor",
           "prefix_allowed_tokens_fn", "padded_token_table"]
