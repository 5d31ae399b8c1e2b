"""A trie over identifier token sequences, held in tensors, and the beam-search constraint built on it.

Public trie decoders (GENRE and its descendants) walk a nested dict once per beam per step from Python.
Here the trie is a sorted edge table: one `searchsorted` per prefix position moves every beam at once, and
one scatter builds the mask, so the constraint's cost barely grows with the number of beams or identifiers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LogitsProcessor


class IdTrie:
    """Prefix tree of token sequences. Every sequence ends with `eos`; after it only `pad`/`eos` are allowed.

    Nodes are integers: the root is 0 and every eos edge leads to one shared leaf (1). Edges are stored sorted by
    `parent * stride + token`, which also sorts them by parent, so `edge_start[n]:edge_start[n + 1]` are node n's
    outgoing edges (CSR layout). Nodes with at most `MAX_NARROW` children also get a row in a padded child table
    (`child_tokens`, `child_nodes`), so the common step is one gather; wider nodes (the root of atomic ids) use CSR.
    """

    ROOT, LEAF = 0, 1
    MAX_NARROW = 32

    def __init__(self, sequences: Sequence[Sequence[int]], eos_token_id: int, pad_token_id: int):
        if len(sequences) == 0:
            raise ValueError("Cannot build an identifier trie from zero identifiers.")
        self.eos_token_id, self.pad_token_id = int(eos_token_id), int(pad_token_id)
        lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
        if int(lengths.min()) == 0:
            raise ValueError("An identifier has no tokens.")
        max_len = int(lengths.max()) + 1  # + eos
        table = torch.full((len(sequences), max_len), -1, dtype=torch.long)
        flat = torch.tensor([t for s in sequences for t in s], dtype=torch.long)
        rows = torch.repeat_interleave(torch.arange(len(sequences)), lengths)
        cols = torch.arange(len(flat)) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
        table[rows, cols] = flat
        if int(flat.min()) < 0:
            raise ValueError("Identifier token ids must be non-negative.")
        if bool((flat == self.eos_token_id).any()):
            raise ValueError("An identifier contains the eos token; eos may only end it.")
        table[torch.arange(len(sequences)), lengths] = self.eos_token_id
        self.stride = int(table.max()) + 1
        self.max_length = max_len
        del flat, rows, cols

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
        """Padded (num_nodes + 1, width) tables of children; row `num_nodes` stands for dead beams. Short rows
        repeat their first child (harmless in a scatter); leaf and dead rows hold pad and eos only."""
        counts = self.edge_start[1:] - self.edge_start[:-1]
        narrow = counts <= self.MAX_NARROW
        width = max(2, int(counts[narrow].max()))
        self.is_wide = torch.cat([~narrow, torch.zeros(1, dtype=torch.bool)])
        first = self.edge_token[self.edge_start[:-1].clamp(max=len(self.edge_token) - 1)]
        tokens = first[:, None].repeat(1, width)
        nodes = torch.full((self.num_nodes, width), -1, dtype=torch.long)
        parents = torch.repeat_interleave(torch.arange(self.num_nodes), counts)
        slots = torch.arange(len(parents)) - self.edge_start[parents]
        keep = narrow[parents]
        tokens[parents[keep], slots[keep]] = self.edge_token[keep]
        nodes[parents[keep], slots[keep]] = self.edge_child[keep]
        stuck = torch.full((width,), self.eos_token_id, dtype=torch.long)
        stuck[0] = self.pad_token_id
        tokens[counts == 0] = stuck
        self.child_tokens = torch.cat([tokens, stuck[None]])
        self.child_nodes = torch.cat([nodes, torch.full((1, width), -1, dtype=torch.long)])
        self.has_wide = bool(self.is_wide.any())

    def to(self, device) -> "IdTrie":
        for name in ("edge_key", "edge_child", "edge_token", "edge_start", "child_tokens", "child_nodes", "is_wide"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    @property
    def device(self) -> torch.device:
        return self.edge_key.device

    def _rows(self, nodes: torch.Tensor) -> torch.Tensor:
        """Child-table row of each node (dead beams, -1, use the last row)."""
        return torch.where(nodes >= 0, nodes, torch.full_like(nodes, self.num_nodes))

    def step(self, nodes: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Child of each node through each token; -1 where there is none (or the node was already -1)."""
        rows = self._rows(nodes)
        match = self.child_tokens[rows] == tokens[:, None]
        child = self.child_nodes[rows].gather(1, match.int().argmax(1, keepdim=True)).squeeze(1)
        child = torch.where(match.any(1), child, torch.full_like(child, -1))
        if self.has_wide:
            wide = self.is_wide[rows]
            if bool(wide.any()):
                child = torch.where(wide, self._csr_step(nodes, tokens), child)
        return child

    def _csr_step(self, nodes: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        keys = nodes * self.stride + tokens
        position = torch.searchsorted(self.edge_key, keys).clamp(max=len(self.edge_key) - 1)
        found = (self.edge_key[position] == keys) & (nodes >= 0) & (tokens >= 0) & (tokens < self.stride)
        return torch.where(found, self.edge_child[position], torch.full_like(nodes, -1))

    def walk(self, prefixes: torch.Tensor) -> torch.Tensor:
        """Node reached by each row of a (R, L) prefix table (generated tokens only, no start token)."""
        nodes = torch.zeros(prefixes.shape[0], dtype=torch.long, device=prefixes.device)
        for column in prefixes.T:
            nodes = self.step(nodes, column)
        return nodes

    def mask_scores(self, nodes: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """`scores` with every token that does not continue an identifier set to -inf (one gather + scatter)."""
        tokens = self.child_tokens[self._rows(nodes)].clamp(max=scores.shape[-1] - 1)
        constrained = torch.full_like(scores, float("-inf"))
        constrained.scatter_(1, tokens, scores.gather(1, tokens))
        if self.has_wide:
            wide = torch.nonzero(self.is_wide[self._rows(nodes)]).flatten()
            if len(wide):
                constrained[wide] = float("-inf")
                rows, wide_tokens = self.allowed_tokens(nodes[wide])
                keep = wide_tokens < scores.shape[-1]
                rows, wide_tokens = wide[rows[keep]], wide_tokens[keep]
                constrained[rows, wide_tokens] = scores[rows, wide_tokens]
        return constrained

    def allowed_tokens(self, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, token) pairs allowed after each node; a leaf or dead row allows only pad and eos."""
        safe = nodes.clamp(min=0)
        counts = torch.where(nodes >= 0, self.edge_start[safe + 1] - self.edge_start[safe], torch.zeros_like(nodes))
        rows = torch.repeat_interleave(torch.arange(len(nodes), device=nodes.device), counts)
        offsets = torch.arange(len(rows), device=nodes.device) - torch.repeat_interleave(
            torch.cumsum(counts, 0) - counts, counts)
        tokens = self.edge_token[self.edge_start[safe][rows] + offsets]
        stuck = torch.nonzero(counts == 0).flatten()
        if len(stuck):
            specials = torch.tensor([self.pad_token_id, self.eos_token_id], device=nodes.device)
            rows = torch.cat([rows, stuck.repeat_interleave(2)])
            tokens = torch.cat([tokens, specials.repeat(len(stuck))])
        return rows, tokens

    def children(self, prefix: Sequence[int]) -> list[int]:
        node = self.walk(torch.tensor([list(prefix)], dtype=torch.long, device=self.device).reshape(1, -1))
        return self.allowed_tokens(node)[1].tolist()


class TrieConstrainedLogitsProcessor(LogitsProcessor):
    """Masks every beam's scores to the tokens that continue an existing identifier, in tensor operations.

    `input_ids` are the decoder's tokens so far; their first column (the decoder start token) is skipped. Beam
    search reorders rows between steps without telling processors, so each call finds every row's parent among
    the previous call's rows (hash, then an exact check) and moves one token down the trie; when that fails (a
    new generation, or anything unexpected) it walks the whole prefix from the root.
    """

    def __init__(self, trie: IdTrie, num_start_tokens: int = 1):
        self.trie = trie
        self.num_start_tokens = num_start_tokens
        self._previous: tuple[torch.Tensor, torch.Tensor] | None = None
        self._weights: torch.Tensor | None = None

    def _nodes(self, input_ids: torch.Tensor) -> torch.Tensor:
        generated = input_ids[:, self.num_start_tokens:]
        if self._previous is not None and generated.shape[1] >= 1:
            previous_ids, previous_nodes = self._previous
            prefix = input_ids[:, :-1]
            if previous_ids.shape == prefix.shape:
                if self._weights is None or len(self._weights) < prefix.shape[1]:
                    self._weights = torch.randint(1, 2 ** 61, (prefix.shape[1] + 64,), device=input_ids.device)
                weights = self._weights[: prefix.shape[1]]
                parent = ((prefix * weights).sum(1)[:, None] == (previous_ids * weights).sum(1)[None, :]).int()
                parent = parent.argmax(1)
                if bool((previous_ids[parent] == prefix).all()):
                    return self.trie.step(previous_nodes[parent], input_ids[:, -1])
        return self.trie.walk(generated)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.trie.device != scores.device:
            self.trie.to(scores.device)
        nodes = self._nodes(input_ids)
        self._previous = (input_ids, nodes)
        return self.trie.mask_scores(nodes, scores)


def prefix_allowed_tokens_fn(trie: IdTrie, num_start_tokens: int = 1):
    """The same constraint for `generate(prefix_allowed_tokens_fn=...)` users (one Python call per beam)."""

    def allowed(batch_id: int, sent: torch.Tensor) -> list[int]:
        return trie.children(sent[num_start_tokens:].tolist())

    return allowed


__all__ = ["IdTrie", "TrieConstrainedLogitsProcessor", "prefix_allowed_tokens_fn"]
