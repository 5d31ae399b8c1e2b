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

    Nodes are integers (root 0). Edges are stored sorted by `parent * stride + token`, which also sorts them by
    parent, so `edge_start[n]:edge_start[n + 1]` are node n's outgoing edges (CSR layout).
    """

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
        table[torch.arange(len(sequences)), lengths] = self.eos_token_id
        if int(table.min()) < -1:
            raise ValueError("Identifier token ids must be non-negative.")
        self.stride = int(table.max()) + 1
        self.max_length = max_len

        keys, children = [], []
        node = torch.zeros(len(sequences), dtype=torch.long)
        num_nodes = 1
        for depth in range(max_len):  # loop over depth only; all identifiers advance together
            active = table[:, depth] >= 0
            level_keys = node[active] * self.stride + table[active, depth]
            unique_keys, inverse = torch.unique(level_keys, return_inverse=True)
            keys.append(unique_keys)
            children.append(torch.arange(num_nodes, num_nodes + len(unique_keys)))
            node[active] = num_nodes + inverse
            num_nodes += len(unique_keys)
        self.edge_key = torch.cat(keys)
        self.edge_child = torch.cat(children)
        self.edge_token = self.edge_key % self.stride
        self.edge_start = torch.searchsorted(self.edge_key // self.stride, torch.arange(num_nodes + 1))
        self.num_nodes = num_nodes

    def to(self, device) -> "IdTrie":
        for name in ("edge_key", "edge_child", "edge_token", "edge_start"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    @property
    def device(self) -> torch.device:
        return self.edge_key.device

    def step(self, nodes: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Child of each node through each token; -1 where there is none (or the node was already -1)."""
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

    `input_ids` are the decoder's tokens so far; their first column (the decoder start token) is skipped.
    """

    def __init__(self, trie: IdTrie, num_start_tokens: int = 1):
        self.trie = trie
        self.num_start_tokens = num_start_tokens

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.trie.device != scores.device:
            self.trie.to(scores.device)
        nodes = self.trie.walk(input_ids[:, self.num_start_tokens:])
        rows, tokens = self.trie.allowed_tokens(nodes)
        keep = tokens < scores.shape[-1]
        rows, tokens = rows[keep], tokens[keep]
        constrained = torch.full_like(scores, float("-inf"))
        constrained[rows, tokens] = scores[rows, tokens]
        return constrained


def prefix_allowed_tokens_fn(trie: IdTrie, num_start_tokens: int = 1):
    """The same constraint for `generate(prefix_allowed_tokens_fn=...)` users (one Python call per beam)."""

    def allowed(batch_id: int, sent: torch.Tensor) -> list[int]:
        return trie.children(sent[num_start_tokens:].tolist())

    return allowed


__all__ = ["IdTrie", "TrieConstrainedLogitsProcessor", "prefix_allowed_tokens_fn"]
