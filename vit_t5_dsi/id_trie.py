"""A trie over identifier token sequences, held in tensors, and the beam-search constraint built on it.

Public trie decoders (GENRE and its descendants) walk a nested dict once per beam per step from Python.
Here the trie is a table of edges plus a padded child table: each step moves every beam one token down from its
parent's node with one gather, and one scatter builds the mask, so the cost barely grows with the number of beams
or identifiers.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch
from transformers import LogitsProcessor


class IdTrie:
    """Prefix tree of token sequences. Every sequence ends with `eos`; after it only `pad`/`eos` are allowed.

    Nodes are integers: the root is 0 and every eos edge leads to one shared leaf (1). Edges are stored sorted by
    `parent * stride + token`, which also sorts them by parent, so `edge_start[n]:edge_start[n + 1]` are node n's
    outgoing edges (CSR layout). Nodes with at most `MAX_NARROW` children also get a row in a padded child table
    (`tables`: a small one for the many nodes with few children, a mid one for the rest), so the common step is one
    gather; wider nodes (the root of atomic ids) use CSR.
    """

    ROOT, LEAF = 0, 1
    MAX_NARROW = 32
    SMALL, MID, WIDE = 0, 1, 2  # which table answers for a node

    def __init__(self, sequences: Sequence[Sequence[int]], eos_token_id: int, pad_token_id: int):
        if len(sequences) == 0:
            raise ValueError("Cannot build an identifier trie from zero identifiers.")
        self.eos_token_id, self.pad_token_id = int(eos_token_id), int(pad_token_id)
        lengths = torch.from_numpy(np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences)))
        if int(lengths.min()) == 0:
            raise ValueError("An identifier has no tokens.")
        max_len = int(lengths.max()) + 1  # + eos
        table = torch.full((len(sequences), max_len), -1, dtype=torch.long)
        flat = torch.from_numpy(np.fromiter(itertools.chain.from_iterable(sequences), dtype=np.int64,
                                            count=int(lengths.sum())))
        if int(flat.min()) < 0:
            raise ValueError("Identifier token ids must be non-negative.")
        if bool((flat == self.eos_token_id).any()):
            raise ValueError("An identifier contains the eos token; eos may only end it.")
        table[torch.arange(max_len)[None, :] < lengths[:, None]] = flat  # row-major: each row gets its tokens
        del flat
        table[torch.arange(len(sequences)), lengths] = self.eos_token_id
        self.stride = int(table.max()) + 1
        self.max_length = max_len

        keys, children = [], []
        node = torch.zeros(len(sequences), dtype=torch.long)
        num_nodes = 2  # root and the shared leaf
        for depth in range(max_len):  # loop over depth only; all identifiers advance together
            active = table[:, depth] >= 0
            level_keys = node[active] * self.stride + table[active, depth]
            unique_keys, inverse = torch.unique(level_keys, return_inverse=True)
            is_eos = unique_keys % self.stride == self.eos_token_id
            inner = torch.cumsum(~is_eos, 0) - 1  # new node numbers for non-eos edges, in key order
            level_children = torch.where(is_eos, torch.full_like(inner, self.LEAF), num_nodes + inner)
            keys.append(unique_keys)
            children.append(level_children)
            node[active] = level_children[inverse]
            num_nodes += int((~is_eos).sum())
        del table, node
        self.edge_key = torch.cat(keys)
        self.edge_child = torch.cat(children)
        self.edge_token = self.edge_key % self.stride
        self.edge_start = torch.searchsorted(self.edge_key // self.stride, torch.arange(num_nodes + 1))
        self.num_nodes = num_nodes
        self._build_child_table()

    def _build_child_table(self) -> None:
        """Padded child tables, in two widths. Short rows repeat their first child token (harmless in a scatter)
        with child node 0: the root is nobody's child, so 0 reads as "no such child". Leaf and dead rows hold pad
        and eos only; the dead row (node -1) is the small table's last row.

        One table as wide as the widest narrow node is mostly padding for deep ids (rq, semantic: most nodes have
        one or two children, a few have dozens), so nodes are split at the width that minimises the two tables'
        size: a small table for the many narrow nodes and a mid table for the rest. Wider nodes still use CSR."""
        counts = (self.edge_start[1:] - self.edge_start[:-1]).numpy()
        narrow = counts <= self.MAX_NARROW
        widest = max(2, int(counts[narrow].max()))
        at_most = np.cumsum(np.bincount(counts[narrow], minlength=widest + 1))  # narrow nodes with <= w children
        widths = np.arange(2, widest + 1)
        cells = at_most[widths] * widths + (at_most[-1] - at_most[widths]) * widest
        width = int(widths[cells.argmin()])
        self.tier = np.where(narrow, np.where(counts <= width, self.SMALL, self.MID), self.WIDE).astype(np.int8)
        self.tier = np.append(self.tier, np.int8(self.SMALL))  # node -1: the dead row
        self.row_of = np.zeros(self.num_nodes + 1, dtype=np.int64)
        self.tables = []
        edge_token, edge_child = self.edge_token.numpy(), self.edge_child.numpy()
        edge_start = self.edge_start.numpy()
        for tier, tier_width in ((self.SMALL, width), (self.MID, widest)):
            members = np.flatnonzero(self.tier[:-1] == tier)
            self.row_of[members] = np.arange(len(members))
            self.tables.append(self._padded_rows(members, tier_width, counts, edge_start, edge_token, edge_child))
        self.dead_row = len(self.tables[self.SMALL][0]) - 1
        self.row_of[self.tier == self.WIDE] = self.dead_row  # read only as filler; CSR answers for them
        self.row_of[-1] = self.dead_row
        self.has_mid = bool((self.tier == self.MID).any())
        self.has_wide = bool((self.tier == self.WIDE).any())
        # Trie state is small integer work: numpy's per-call overhead is ~1 us where torch's is ~5-10 us, so the
        # tables live as numpy arrays and only the scores stay in torch.
        self.edge_key, self.edge_child, self.edge_token, self.edge_start = (
            self.edge_key.numpy(), edge_child, edge_token, edge_start)

    def _padded_rows(self, members, width, counts, edge_start, edge_token, edge_child):
        """(tokens, child nodes) int32 tables with one row per member node plus a dead row at the end."""
        tokens = np.empty((len(members) + 1, width), dtype=np.int32)
        nodes = np.zeros((len(members) + 1, width), dtype=np.int32)
        member_counts, starts = counts[members], edge_start[members]
        tokens[:-1] = edge_token[np.minimum(starts, len(edge_token) - 1)][:, None]
        rows = np.repeat(np.arange(len(members)), member_counts)
        slots = np.arange(len(rows)) - np.repeat(np.cumsum(member_counts) - member_counts, member_counts)
        tokens[rows, slots] = edge_token[starts[rows] + slots]
        nodes[rows, slots] = edge_child[starts[rows] + slots]
        del rows, slots
        stuck = np.full(width, self.eos_token_id, dtype=np.int32)
        stuck[0] = self.pad_token_id
        tokens[np.append(member_counts == 0, True)] = stuck
        return tokens, nodes

    def _table_step(self, tier: int, rows: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        child_tokens, child_nodes = self.tables[tier]
        match = child_tokens[rows] == tokens[:, None]
        child = (child_nodes[rows] * match).sum(1, dtype=np.int64)  # one real match at most; fillers add 0
        return np.where(child > 0, child, -1)

    def step(self, nodes: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Child of each node through each token; -1 where there is none (or the node was already -1)."""
        rows = self.row_of[nodes]  # node -1 reads the dead row
        if not (self.has_mid or self.has_wide):
            return self._table_step(self.SMALL, rows, tokens)
        tier = self.tier[nodes]
        child = np.full(len(nodes), -1, dtype=np.int64)
        for kind in (self.SMALL, self.MID):
            chosen = np.flatnonzero(tier == kind)
            if len(chosen):
                child[chosen] = self._table_step(kind, rows[chosen], tokens[chosen])
        wide = np.flatnonzero(tier == self.WIDE)
        if len(wide):
            child[wide] = self._csr_step(nodes[wide], tokens[wide])
        return child

    def _token_rows(self, nodes: np.ndarray) -> np.ndarray:
        """(beams, width) tokens each node allows, padded by repeating an allowed token (wide nodes: filler)."""
        rows = self.row_of[nodes]
        if not self.has_mid:
            return self.tables[self.SMALL][0][rows]
        is_mid = self.tier[nodes] == self.MID
        small = self.tables[self.SMALL][0][np.where(is_mid, self.dead_row, rows)]
        mid = np.flatnonzero(is_mid)
        if not len(mid):
            return small
        widened = np.repeat(small[:, :1], self.tables[self.MID][0].shape[1], axis=1)
        widened[:, :small.shape[1]] = small
        widened[mid] = self.tables[self.MID][0][rows[mid]]
        return widened

    def _csr_step(self, nodes: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        keys = nodes * self.stride + tokens
        position = np.searchsorted(self.edge_key, keys).clip(max=len(self.edge_key) - 1)
        found = (self.edge_key[position] == keys) & (nodes >= 0) & (tokens >= 0) & (tokens < self.stride)
        return np.where(found, self.edge_child[position], -1)

    def walk(self, prefixes: np.ndarray) -> np.ndarray:
        """Node reached by each row of a (R, L) prefix table (generated tokens only, no start token)."""
        prefixes = np.asarray(prefixes, dtype=np.int64).reshape(len(prefixes), -1)
        nodes = np.zeros(len(prefixes), dtype=np.int64)
        for column in prefixes.T:
            nodes = self.step(nodes, column)
        return nodes

    def mask_scores(self, nodes: np.ndarray, scores: torch.Tensor) -> torch.Tensor:
        """`scores` with every token that does not continue an identifier set to -inf (one gather + scatter)."""
        tokens = torch.from_numpy(self._token_rows(nodes).astype(np.int64)).to(scores.device, non_blocking=True)
        constrained = torch.full_like(scores, float("-inf"))
        if self.stride > scores.shape[-1]:
            # ids use tokens the model cannot write: never allow them. They are read through a clipped index and
            # given -inf, and "amax" keeps a real score where a clipped index collides with an allowed token.
            outside = tokens >= scores.shape[-1]
            tokens = tokens.clamp(max=scores.shape[-1] - 1)
            values = scores.gather(1, tokens).masked_fill(outside, float("-inf"))
            constrained.scatter_reduce_(1, tokens, values, reduce="amax")
        else:
            constrained.scatter_(1, tokens, scores.gather(1, tokens))
        if self.has_wide:
            wide = np.flatnonzero(self.tier[nodes] == self.WIDE)
            if len(wide):
                rows, wide_tokens = self.allowed_tokens(nodes[wide])
                keep = wide_tokens < scores.shape[-1]
                rows = torch.from_numpy(wide[rows[keep]]).to(scores.device)
                wide_tokens = torch.from_numpy(wide_tokens[keep]).to(scores.device)
                constrained[torch.from_numpy(wide).to(scores.device)] = float("-inf")
                constrained[rows, wide_tokens] = scores[rows, wide_tokens]
        return constrained

    def allowed_tokens(self, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, token) pairs allowed after each node; a leaf or dead row allows only pad and eos."""
        nodes = np.asarray(nodes, dtype=np.int64)
        safe = nodes.clip(min=0)
        counts = np.where(nodes >= 0, self.edge_start[safe + 1] - self.edge_start[safe], 0)
        rows = np.repeat(np.arange(len(nodes)), counts)
        offsets = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
        tokens = self.edge_token[self.edge_start[safe][rows] + offsets]
        stuck = np.flatnonzero(counts == 0)
        if len(stuck):
            rows = np.concatenate([rows, np.repeat(stuck, 2)])
            tokens = np.concatenate([tokens, np.tile([self.pad_token_id, self.eos_token_id], len(stuck))])
        return rows, tokens

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


__all__ = ["IdTrie", "TrieConstrainedLogitsProcessor", "prefix_allowed_tokens_fn"]
