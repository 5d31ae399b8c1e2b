#!/usr/bin/env python
"""Cost of constraining beam search to existing image ids: our tensor trie vs. a GENRE-style dict trie.

For each number of ids N and scheme (naive digit strings, semantic k-means paths, rq codes), it prints the trie's
build time and extra peak memory, then decode times for batches of 1 and 32 queries (10 beams, 10 returned) on a
random decoder: tiny with a 4K vocabulary, or with `--width base` T5-base widths and T5's 32K vocabulary:
  (a) unconstrained beam search (same number of steps),
  (b) TrieConstrainedLogitsProcessor (this project),
  (c) a nested-dict trie called through prefix_allowed_tokens_fn (one Python call per beam per step).
The constraint's own cost is measured directly: the time spent inside each constraint's logits processor
(both go through the same `logits_processor` path; (b)-(a) also mixes in search-length differences). Targets at
100K and 1M ids: (b) <= 1.10 x (a), (b)-(a) <= ((c)-(a)) / 3, and the 1M-id trie built in <= 10 s with <= 500 MB
extra memory.

    python benchmarks/bench_constrained_decoding.py                 # 1K, 10K, 100K, 1M (several minutes)
    python benchmarks/bench_constrained_decoding.py --sizes 1000 10000 --repeats 2
    python benchmarks/bench_constrained_decoding.py --width base --sizes 100000 1000000 --schemes rq
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import threading
import time

import numpy as np
import psutil
import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import PrefixConstrainedLogitsProcessor

from vit_t5_dsi import ViTT5DSIConfig, ViTT5DSIForConditionalGeneration
from vit_t5_dsi.checkpoint.id_trie import IdTrie, TrieConstrainedLogitsProcessor

PAD, EOS = 0, 1
DIGIT_TOKENS = np.arange(10, 20)  # token ids of "0".."9" in the benchmark's vocabulary
VOCAB = 4096
VOCAB_OF_WIDTH = {"tiny": 4096, "base": 32128}  # base: T5's own 32K vocabulary


def naive_ids(n: int) -> list[list[int]]:
    """DSI's naive string ids: the decimal digits of 0..N-1, one token per digit."""
    return [DIGIT_TOKENS[[int(c) for c in str(i)]].tolist() for i in range(n)]


def semantic_ids(n: int, branches: int = 10, leaf: int = 100, seed: int = 0) -> list[list[int]]:
    """The token structure of DSI's semantic ids (a k-means tree, k=10, leaves of <= 100) over clustered
    embeddings. For speed at 1M ids the tree is cut by sorting random embeddings level by level, which yields
    the same shape (unbalanced clusters, variable depth) as hierarchical_kmeans_ids."""
    rng = np.random.default_rng(seed)
    ids: list[list[int]] = [[] for _ in range(n)]

    def split(members: np.ndarray, depth: int):
        if len(members) <= leaf:
            width = len(str(max(len(members) - 1, 0)))
            for position, member in enumerate(members):
                ids[member].extend(DIGIT_TOKENS[[int(c) for c in str(position).zfill(width)]].tolist())
            return
        shares = rng.dirichlet(np.full(branches, 2.0))  # uneven cluster sizes, like real k-means
        bounds = np.concatenate([[0], np.cumsum(np.round(shares * len(members)).astype(int))[:-1], [len(members)]])
        for cluster in range(branches):
            part = members[bounds[cluster]:bounds[cluster + 1]]
            for member in part:
                ids[member].append(int(DIGIT_TOKENS[cluster]))
            if len(part):
                split(part, depth + 1)

    split(rng.permutation(n), 0)
    return ids


def rq_ids(n: int, levels: int = 3, seed: int = 0) -> list[list[int]]:
    """The token structure of rq ids: one token per (level, code), codes per level as run_dsi_image.py picks them
    by default (the smallest K with K ** levels >= 4N), uneven code frequencies like k-means on real residuals,
    and a position token only for images that share every code."""
    codes_per_level = 2
    while codes_per_level ** levels < 4 * n:
        codes_per_level += 1
    rng = np.random.default_rng(seed)
    codes = np.stack([rng.choice(codes_per_level, size=n, p=rng.dirichlet(np.full(codes_per_level, 2.0)))
                      for _ in range(levels)], axis=1)
    _, cell, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    cell = cell.reshape(-1)
    order = np.argsort(cell, kind="stable")
    starts = np.r_[0, np.flatnonzero(np.diff(cell[order])) + 1]
    position = np.empty(n, dtype=np.int64)
    ranks = np.arange(n)
    position[order] = ranks - starts[np.searchsorted(starts, ranks, side="right") - 1]
    tokens = 20 + np.arange(levels) * codes_per_level + codes  # (n, levels) distinct per (level, code)
    collision_token = 20 + levels * codes_per_level + position
    if collision_token.max() >= VOCAB:
        raise ValueError("rq benchmark ids need a larger vocabulary")
    return [row + [int(c)] if counts[k] > 1 else row
            for row, c, k in zip(tokens.tolist(), collision_token.tolist(), cell.tolist())]


ID_SCHEMES = {"naive": naive_ids, "semantic": semantic_ids, "rq": rq_ids}


class DictTrie:
    """The GENRE-style reference: nested dicts, walked from the root for every beam at every step."""

    def __init__(self, sequences):
        self.root: dict = {}
        for sequence in sequences:
            node = self.root
            for token in list(sequence) + [EOS]:
                node = node.setdefault(token, {})

    def allowed(self, batch_id, sent):
        node = self.root
        for token in sent[1:].tolist():
            node = node.get(token)
            if node is None:
                return [PAD, EOS]
        return list(node) or [PAD, EOS]


def peak_extra_memory(fn):
    """Run fn, returning (result, seconds, peak RSS growth in MB) sampled every 2 ms."""
    process = psutil.Process()
    baseline, peak, done = process.memory_info().rss, [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.002)

    thread = threading.Thread(target=sample)
    thread.start()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    done.set()
    thread.join()
    peak[0] = max(peak[0], process.memory_info().rss)
    return result, seconds, (peak[0] - baseline) / 2 ** 20


class Timed(LogitsProcessor):
    """Accumulates the time spent inside one logits processor: the constraint's own cost, measured directly."""

    def __init__(self, processor):
        self.processor, self.seconds = processor, 0.0

    def __call__(self, input_ids, scores):
        start = time.perf_counter()
        scores = self.processor(input_ids, scores)
        self.seconds += time.perf_counter() - start
        return scores


def measure_build(scheme: str, n: int) -> tuple[float, float]:
    """Seconds and peak extra RSS (MB) of building the trie, ids already in memory."""
    torch.set_num_threads(1)
    sequences = ID_SCHEMES[scheme](n)
    _, seconds, megabytes = peak_extra_memory(lambda: IdTrie(sequences, EOS, PAD))
    return seconds, megabytes


def decode_seconds(model, encoder_outputs, mask, steps, repeats, constraint=None, **kwargs) -> tuple[float, float]:
    """Median total decode time and median time inside the constraint, over `repeats` runs."""
    totals, owns = [], []
    for _ in range(repeats):
        timed = Timed(constraint) if constraint is not None else None
        start = time.perf_counter()
        model.generate(encoder_outputs=encoder_outputs, attention_mask=mask, num_beams=10, num_return_sequences=10,
                       max_new_tokens=steps, do_sample=False, early_stopping=True,
                       logits_processor=LogitsProcessorList([timed] if timed else []), **kwargs)
        totals.append(time.perf_counter() - start)
        owns.append(timed.seconds if timed else 0.0)
    return statistics.median(totals), statistics.median(owns)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000, 1_000_000])
    parser.add_argument("--schemes", nargs="+", default=list(ID_SCHEMES), choices=list(ID_SCHEMES))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=3, help="Median of this many decodes per cell.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps timings steadier).")
    parser.add_argument("--width", default="tiny", choices=list(VOCAB_OF_WIDTH),
                        help="Decoder widths: tiny (4K vocabulary) or base (T5-base widths, 32K vocabulary).")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    vocab = VOCAB_OF_WIDTH[args.width]
    config = ViTT5DSIConfig.from_preset(args.width, vocab_size=vocab)
    model = ViTT5DSIForConditionalGeneration(config).eval()
    # A decoder that never writes eos by itself runs (a) for exactly as many steps as the constrained searches.
    model.generation_config.eos_token_id = EOS

    rows = []
    for scheme in args.schemes:
        for n in args.sizes:
            sequences = ID_SCHEMES[scheme](n)
            with multiprocessing.get_context("spawn").Pool(1) as pool:  # a fresh process: no reused heap
                build_s, build_mb = pool.apply(measure_build, (scheme, n))
            trie = IdTrie(sequences, EOS, PAD)
            steps = trie.max_length
            dict_trie = DictTrie(sequences)
            for batch in args.batches:
                with torch.no_grad():
                    encoder_outputs, mask, _ = model.encode(
                        pixel_values=torch.randn(batch, 3, config.image_size, config.image_size))
                unconstrained, _ = decode_seconds(model, encoder_outputs, mask, steps, args.repeats,
                                                  eos_token_id=vocab - 1, min_new_tokens=steps)
                ours, ours_own = decode_seconds(model, encoder_outputs, mask, steps, args.repeats,
                                                TrieConstrainedLogitsProcessor(trie))
                genre, genre_own = decode_seconds(model, encoder_outputs, mask, steps, args.repeats,
                                                  PrefixConstrainedLogitsProcessor(dict_trie.allowed, num_beams=10))
                rows.append((scheme, n, build_s, build_mb, batch, unconstrained, ours, genre, ours_own, genre_own))
                print_row(rows[-1], flush=True)
    print_table(rows)


HEADER = (f"{'scheme':<9}{'ids':>10}{'build s':>8}{'build MB':>9}{'batch':>6}{'(a) s':>8}{'(b) s':>8}{'(c) s':>8}"
          f"{'b/a':>6}{'c/a':>6}{'b own ms':>9}{'c own ms':>9}{'b/c own':>8}  targets")


def print_row(row, flush=False):
    """'own' = time inside the constraint itself; (b)-(a) also includes search-length differences."""
    scheme, n, build_s, build_mb, batch, a, b, c, own_b, own_c = row
    verdict = ""
    if n >= 100_000:
        checks = [b <= 1.10 * a, own_b <= own_c / 3]
        if n >= 1_000_000:
            checks += [build_s <= 10, build_mb <= 500]
        verdict = "met" if all(checks) else "MISSED"
    print(f"{scheme:<9}{n:>10,}{build_s:>8.2f}{build_mb:>9.0f}{batch:>6}{a:>8.3f}{b:>8.3f}{c:>8.3f}{b / a:>6.2f}"
          f"{c / a:>6.2f}{own_b * 1e3:>9.1f}{own_c * 1e3:>9.1f}{own_b / own_c:>8.2f}  {verdict}", flush=flush)


def print_table(rows):
    print("\nConstrained decoding: (a) unconstrained, (b) tensor trie processor, (c) dict trie via "
          "prefix_allowed_tokens_fn; 10 beams, 10 returned")
    print(HEADER)
    for row in rows:
        print_row(row)


if __name__ == "__main__":
    main()
