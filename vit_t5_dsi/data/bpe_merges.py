"""Byte-pair merges learnt deterministically: the same captions give the same merges in every run and process.

Written by hand because the `tokenizers` BPE trainer is not deterministic: it numbers word-internal symbols
(`##x`) in hash-map order and breaks ties between equally frequent pairs by those numbers, so two runs with one
seed, even two calls in one process, learn different merges for equally frequent pairs. Words the training
captions never use then split differently, and the same query scores differently in two runs of one seed. Here
ties go to the pair that sorts first, and everything is visited in sorted order. The `tokenizers` BPE *model*
still does the tokenizing, with these merges.

The algorithm is the usual one (Sennrich et al., 2016) with incremental pair counts: a heap of (-count, pair)
with stale entries skipped, and, per pair, the words it occurs in, so a merge only revisits those words.
"""

from __future__ import annotations

import heapq
from collections import defaultdict


def learn_bpe(word_counts: dict[str, int], vocab_size: int, alphabet: list[str], special_tokens: list[str],
              prefix: str = "##") -> tuple[list[str], list[tuple[str, str]]]:
    """(vocabulary in creation order, merges in rank order) for `word_counts` (pre-tokenized, normalised words).

    The vocabulary starts with `special_tokens`, `alphabet` and the characters the words use (each also in its
    word-internal `prefix` form), then grows by one merge at a time, the most frequent adjacent pair first (ties:
    the pair that sorts first), until it has `vocab_size` tokens or no pair is left."""
    characters = list(dict.fromkeys([*alphabet, *sorted({c for word in word_counts for c in word} - set(alphabet))]))
    vocab = list(dict.fromkeys([*special_tokens, *characters, *(prefix + c for c in characters)]))
    known = set(vocab)
    words = sorted(word_counts)
    counts = [word_counts[word] for word in words]
    symbols = [[word[0], *(prefix + c for c in word[1:])] for word in words]
    pair_counts: dict[tuple[str, str], int] = defaultdict(int)
    occurs_in: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, pieces in enumerate(symbols):
        for pair in zip(pieces, pieces[1:]):
            pair_counts[pair] += counts[i]
            occurs_in[pair].add(i)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while len(vocab) < vocab_size and heap:
        negative, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -negative or -negative <= 0:
            continue  # stale: the count changed since this entry was pushed
        left, right = pair
        merged = left + right[len(prefix):]
        merges.append(pair)
        if merged not in known:
            known.add(merged)
            vocab.append(merged)
        changed: set[tuple[str, str]] = set()
        for i in sorted(occurs_in.pop(pair, ())):
            pieces = symbols[i]
            for old in zip(pieces, pieces[1:]):
                pair_counts[old] -= counts[i]
                changed.add(old)
            joined, j = [], 0
            while j < len(pieces):
                if j + 1 < len(pieces) and (pieces[j], pieces[j + 1]) == pair:
                    joined.append(merged)
                    j += 2
                else:
                    joined.append(pieces[j])
                    j += 1
            symbols[i] = joined
            for new in zip(joined, joined[1:]):
                pair_counts[new] += counts[i]
                occurs_in[new].add(i)
                changed.add(new)
        pair_counts.pop(pair, None)
        for other in sorted(changed - {pair}):
            if pair_counts[other] > 0:
                heapq.heappush(heap, (-pair_counts[other], other))
    return vocab, merges


__all__ = ["learn_bpe"]
