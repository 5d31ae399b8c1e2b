#!/usr/bin/env python
"""How fast a query is answered, and with how much index memory, as the collection grows: generative retrieval
against dense search, side by side in one run (issue #25).

For N indexed images (default 10K, 100K, 1M, 10M; base widths up to --base_max_size, 1M) and batches of 1 and 32
caption queries (12 tokens each), per-query latency of:
  generate:   encode the query with T5's encoder, then `model.generate` constrained by the trie's logits processor
              (10 beams, 10 returned), through `rank_by_generation(search="generate")`;
  trie:       the same search through the trie beam search (`trie_beam_search` in `ranking.py`,
              `search="trie"`), which returns the same ranking;
  dense:      encode the query (T5 encoder, pooled, projected), then one matrix product over N x d image embeddings
              in torch and a top-10;
  faiss flat / IVF: the same embeddings in a faiss flat (exact) and an IVF index built as the search surfaces build
              it (`search_embeddings` in `ranking.py`: 4 sqrt(N) lists, 64 training points per list, 32 probed;
              --ivf_* change it).
Ids are rq ids of 4 levels x 256 codes (uneven code frequencies, a fifth position token only where ids collide),
whose tokens come after the text vocabulary as `tokenizer.add_tokens` places them; `--scheme` picks another of
bench_constrained_decoding's schemes (lists: small N only). Models have random weights (speed does not depend on
them): `tiny` with a 4K text vocabulary, `base` with T5-base widths and T5's 32K vocabulary.

Each row also gives the index's size (MB and bytes per image), its build time and peak memory (RSS growth, sampled
every 5 ms) on both sides, and each search's share of its FLOP bound: the multiply-adds it must do at this
machine's measured GEMM rate, divided by the measured time. `--rq_kmeans_images` times rq id building (k-means,
`residual_quantization.py`) on that many random embeddings. Prints one table, then the issue's targets with a
verdict, and writes everything as JSON (--output_json).

    python benchmarks/bench_retrieval_latency.py --threads 1                      # everything (an hour or more)
    python benchmarks/bench_retrieval_latency.py --widths tiny --sizes 1000 10000 --rq_kmeans_images 0
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_constrained_decoding import ID_SCHEMES  # noqa: E402
from bench_index_memory import PeakRSS, coco_keys  # noqa: E402

from vit_t5_dsi import ViTT5DSIConfig, ViTT5DSIDualEncoderModel, ViTT5DSIForConditionalGeneration  # noqa: E402
from vit_t5_dsi.checkpoint.ranking import (IVF_LISTS_PER_SQRT_N, IVF_NPROBE, IVF_TRAINING_POINTS_PER_LIST,
                                           distinct_topk, rank_by_generation, rank_by_similarity)
from vit_t5_dsi.checkpoint.image_index import ImageIndex  # noqa: E402

PAD, EOS, QUERY_TOKENS, K = 0, 1, 12, 10
VOCAB = {"tiny": 4096, "base": 32128}  # text vocabulary; rq code tokens are added after it
LEVELS, CODES, POSITION_TOKENS = 4, 256, 128
MB = 2 ** 20


def rq_table(n: int, first_token: int, seed: int = 0):
    """(n, 5) int32 rq token table (4 code tokens, a position token only where ids collide), lengths, pieces."""
    rng = np.random.default_rng(seed)
    codes = np.stack([rng.choice(CODES, size=n, p=rng.dirichlet(np.full(CODES, 2.0))) for _ in range(LEVELS)], 1)
    cell = np.zeros(n, dtype=np.int64)
    for level in range(LEVELS):
        cell = (cell << 8) | codes[:, level]
    order = np.argsort(cell, kind="stable")
    starts = np.flatnonzero(np.r_[True, cell[order][1:] != cell[order][:-1]])
    sizes = np.diff(np.r_[starts, n])
    position, shared = np.empty(n, dtype=np.int64), np.empty(n, dtype=bool)
    position[order] = np.arange(n) - np.repeat(starts, sizes)
    shared[order] = np.repeat(sizes > 1, sizes)
    if int(position.max()) >= POSITION_TOKENS:
        raise ValueError("more colliding ids than position tokens")
    table = np.empty((n, LEVELS + 1), dtype=np.int32)
    table[:, :LEVELS] = first_token + np.arange(LEVELS) * CODES + codes
    table[:, LEVELS] = np.where(shared, first_token + LEVELS * CODES + position, -1)
    pieces = {first_token + t: f"<c{t}>" for t in range(LEVELS * CODES + POSITION_TOKENS)}
    return table, np.where(shared, LEVELS + 1, LEVELS), pieces


def build_generative_index(n: int, scheme: str, first_token: int) -> tuple[ImageIndex, dict]:
    """The image index and its decoding constraint, built from the token table; its size, build time and peak."""
    if scheme == "rq":
        table, lengths, pieces = rq_table(n, first_token)
        keys = coco_keys(n)
        with PeakRSS() as peak:
            start = time.perf_counter()
            index = ImageIndex.from_token_table(keys, table, lengths, scheme="rq", eos_token_id=EOS,
                                                pad_token_id=PAD, id_string_pieces=pieces)
            trie = index.trie
            seconds = time.perf_counter() - start
        del table
    else:
        ids = ID_SCHEMES[scheme](n)
        with PeakRSS() as peak:
            start = time.perf_counter()
            index = ImageIndex([f"{i:012d}.jpg" for i in range(n)], [" ".join(map(str, r)) for r in ids], ids,
                               "semantic", EOS, PAD)
            trie = index.trie
            seconds = time.perf_counter() - start
    size = index.nbytes + trie.nbytes
    return index, {"mb": size / MB, "bytes_per_image": size / n, "trie_bytes_per_image": trie.nbytes / n,
                   "build_s": seconds, "build_peak_mb": (peak.peak - peak.start) / MB}


def dense_indexes(embeddings: np.ndarray, args) -> dict:
    """faiss flat and IVF indexes over the embeddings, each with its size, build time and peak memory."""
    try:
        import faiss
    except ImportError:
        return {}
    n, dim = embeddings.shape
    built = {}
    with PeakRSS() as peak:
        start = time.perf_counter()
        flat = faiss.IndexFlatIP(dim)
        flat.add(embeddings)
        built["faiss_flat"] = (flat, {"mb": n * dim * 4 / MB, "bytes_per_image": dim * 4.0,
                                      "build_s": time.perf_counter() - start,
                                      "build_peak_mb": (peak.peak - peak.start) / MB})
    lists = max(1, int(args.ivf_lists_per_sqrt_n * math.sqrt(n)))
    with PeakRSS() as peak:
        start = time.perf_counter()
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(0).choice(n, min(n, lists * args.ivf_training_points_per_list), replace=False)
        ivf.train(embeddings[np.sort(sample)])
        ivf.add(embeddings)
        ivf.nprobe = min(args.ivf_nprobe, lists)
        size = n * (dim * 4 + 8) + lists * dim * 4  # vectors and ids in the inverted lists, and the centroids
        built["faiss_ivf"] = (ivf, {"mb": size / MB, "bytes_per_image": size / n, "lists": lists,
                                    "nprobe": ivf.nprobe, "build_s": time.perf_counter() - start,
                                    "build_peak_mb": (peak.peak - peak.start) / MB})
    return built


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gemm_gflops(dim: int, rows: int = 320) -> float:
    """Measured float32 matrix-product rate at the widths these models run (rows x dim @ dim x 4 dim)."""
    a, b = torch.randn(rows, dim), torch.randn(dim, 4 * dim)
    seconds = median_seconds(lambda: a @ b, 20)
    return 2 * rows * dim * 4 * dim / seconds / 1e9


def t5_macs(config, tokens: int) -> float:
    """Multiply-adds of one T5 layer's self-attention projections and feed-forward over `tokens` tokens."""
    d, ff = config.d_model, config.d_ff * (3 if config.is_gated_act else 2)
    inner = config.num_heads * config.d_kv
    return tokens * (4 * d * inner + d * ff)


def flop_counts(text_config, dim: int, batch: int, steps: int, n: int, ivf: dict | None) -> dict:
    """Minimal FLOPs of one batch: the encoder (12 tokens per query), then per search its own work."""
    d, inner, layers = text_config.d_model, text_config.num_heads * text_config.d_kv, text_config.num_layers
    encoder = layers * t5_macs(text_config, batch * QUERY_TOKENS)
    rows = batch + (steps - 1) * batch * K  # the first step runs one row per query, later ones one per beam
    decoder = text_config.num_decoder_layers * (t5_macs(text_config, rows) + 2 * d * inner * rows
                                                + 2 * d * inner * batch * QUERY_TOKENS)  # + cross q/o, cross k/v
    head = rows * d * text_config.vocab_size
    counts = {"trie": 2 * (encoder + decoder + head), "generate": 2 * (encoder + decoder + head),
              "dense": 2 * (encoder + batch * (d * dim + n * dim))}
    counts["faiss_flat"] = counts["dense"]
    if ivf:
        scanned = n * ivf["nprobe"] / ivf["lists"] + ivf["lists"]
        counts["faiss_ivf"] = 2 * (encoder + batch * (d * dim + scanned * dim))
    return counts


def rq_kmeans_cost(n: int, dim: int) -> dict:
    """Time and peak memory of building rq ids (4 levels x 256 codes) for n random unit embeddings."""
    from vit_t5_dsi.identifiers.residual_quantization import residual_quantize

    embeddings = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)
    with PeakRSS() as peak:
        start = time.perf_counter()
        codes = residual_quantize(embeddings, num_levels=LEVELS, codes_per_level=CODES)
        seconds = time.perf_counter() - start
    return {"images": n, "dim": dim, "seconds": seconds, "peak_mb": (peak.peak - peak.start) / MB,
            "images_with_position_token": int((codes.position >= 0).sum())}


def measure(width, n, args, models, gflops) -> list[dict]:
    generative, dense = models
    index, gen_index = build_generative_index(n, args.scheme, VOCAB[width])
    dim = dense.text_projection.out_features
    embeddings = torch.nn.functional.normalize(torch.randn(n, dim), dim=1)
    built = dense_indexes(embeddings.numpy(), args)
    rows = []
    for batch in args.batches:
        queries = torch.randint(3, 1000, (batch, QUERY_TOKENS))

        def generative_search(search):
            return rank_by_generation(generative, index, K, input_ids=queries, search=search)

        def dense_search(faiss_index=None):
            text = dense.encode_texts(queries)
            if faiss_index is None:
                return rank_by_similarity(text, embeddings, K)
            scores, positions = faiss_index.search(text.numpy(), K)
            return distinct_topk(positions, scores, K)

        repeats = args.repeats if n < 10_000_000 or args.repeats_10m is None else args.repeats_10m
        with torch.no_grad():
            seconds = {"generate": median_seconds(lambda: generative_search("generate"), repeats),
                       "trie": median_seconds(lambda: generative_search("trie"), repeats),
                       "dense": median_seconds(dense_search, repeats)}
            for name, (faiss_index, _) in built.items():
                seconds[name] = median_seconds(lambda i=faiss_index: dense_search(i), repeats)
        flops = flop_counts(generative.config.text_config, dim, batch, index.max_id_length, n,
                            built["faiss_ivf"][1] if "faiss_ivf" in built else None)
        rows.append({"width": width, "num_images": n, "batch_size": batch, "scheme": args.scheme,
                     "repeats": repeats, "ms_per_query": {name: 1000 * s / batch for name, s in seconds.items()},
                     "flop_bound_share": {name: flops[name] / (gflops * 1e9) / s for name, s in seconds.items()},
                     "gemm_gflops": gflops, "generative_index": gen_index,
                     "dense_index": {name: info for name, (_, info) in built.items()},
                     "dense_embeddings_mb": n * dim * 4 / MB})
        print_row(rows[-1])
    return rows


HEADER = (f"{'width':<5}{'N':>11}{'b':>3}{'generate':>9}{'trie':>8}{'dense':>8}{'flat':>8}{'ivf':>7}   "
          f"{'gen MB':>7}{'B/img':>6}{'build s':>8}{'peak MB':>8}   {'ivf MB':>7}{'B/img':>6}{'build s':>8}"
          f"{'peak MB':>8}   {'%FLOP trie':>10}{'ivf':>6}")


def print_row(row: dict) -> None:
    ms, gen, share = row["ms_per_query"], row["generative_index"], row["flop_bound_share"]
    ivf = row["dense_index"].get("faiss_ivf", {})
    nan = float("nan")
    print(f"{row['width']:<5}{row['num_images']:>11,}{row['batch_size']:>3}{ms['generate']:>9.2f}{ms['trie']:>8.2f}"
          f"{ms['dense']:>8.2f}{ms.get('faiss_flat', nan):>8.2f}{ms.get('faiss_ivf', nan):>7.2f}   "
          f"{gen['mb']:>7.1f}{gen['bytes_per_image']:>6.1f}{gen['build_s']:>8.2f}{gen['build_peak_mb']:>8.0f}   "
          f"{ivf.get('mb', nan):>7.1f}{ivf.get('bytes_per_image', nan):>6.0f}{ivf.get('build_s', nan):>8.1f}"
          f"{ivf.get('build_peak_mb', nan):>8.0f}   {100 * share['trie']:>9.1f}%"
          f"{100 * share.get('faiss_ivf', nan):>5.1f}%", flush=True)


def verdicts(rows: list[dict]) -> list[tuple[str, float, float, str]]:
    """The issue's latency targets, on the rows that measure them: (target, generative, bound, verdict)."""
    out = []

    def row(width, batch):
        found = [r for r in rows if r["width"] == width and r["num_images"] == 1_000_000 and r["batch_size"] == batch]
        return found[0]["ms_per_query"] if found else None

    for width, batch, factor, against in [("tiny", 32, 1, "faiss_ivf"), ("tiny", 1, 2, "faiss_ivf"),
                                          ("base", 32, 6, "fastest dense")]:
        ms = row(width, batch)
        if ms is None:
            continue
        dense = min(v for name, v in ms.items() if name not in ("trie", "generate")) \
            if against == "fastest dense" else ms.get(against, float("nan"))
        name = f"{width} 1M batch {batch}: trie ms/q <= {factor} x {against}"
        out.append((name, ms["trie"], factor * dense, "met" if ms["trie"] <= factor * dense else "missed"))
    return out


def report(rows: list[dict], kmeans: dict | None, table: bool = True) -> None:
    """The table of `rows` (already printed row by row during a run), the rq id building cost and the verdicts."""
    if rows and table:
        print(HEADER)
        for row in rows:
            print_row(row)
        print()
    if kmeans:
        print(f"rq ids (k-means, {LEVELS} levels x {CODES} codes) for {kmeans['images']:,} embeddings of "
              f"d = {kmeans['dim']}: {kmeans['seconds']:.1f} s, peak RSS growth {kmeans['peak_mb']:.0f} MB")
    for name, generative_ms, bound_ms, verdict in verdicts(rows):
        print(f"{name:<52}{generative_ms:>9.2f} vs {bound_ms:>8.2f}  {verdict}")


def set_threads(threads: int) -> None:
    """Both sides on the same number of threads: torch's and faiss's (faiss has its own OpenMP pool, whose idle
    threads also spin for a while after a search and slow whatever runs next)."""
    torch.set_num_threads(threads)
    try:
        import faiss

        faiss.omp_set_num_threads(threads)
    except ImportError:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", nargs="+", default=["tiny", "base"], choices=list(VOCAB))
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000, 10_000_000])
    parser.add_argument("--base_max_size", type=int, default=1_000_000, help="largest N measured at base widths")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--scheme", default="rq", choices=list(ID_SCHEMES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--repeats_10m", type=int, default=None, help="repeats at N >= 10M (default --repeats)")
    parser.add_argument("--ivf_lists_per_sqrt_n", type=float, default=IVF_LISTS_PER_SQRT_N)
    parser.add_argument("--ivf_training_points_per_list", type=int, default=IVF_TRAINING_POINTS_PER_LIST)
    parser.add_argument("--ivf_nprobe", type=int, default=IVF_NPROBE)
    parser.add_argument("--rq_kmeans_images", type=int, default=1_000_000, help="0 skips the rq id building")
    parser.add_argument("--rq_kmeans_dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output_json", default="bench_retrieval_latency.json")
    parser.add_argument("--from_json", nargs="+", help="print one table and the verdicts from earlier runs' JSON "
                        "(runs with different settings, e.g. fewer repeats at 10M), measuring nothing")
    args = parser.parse_args()
    if args.from_json:
        runs = [json.load(open(path, encoding="utf-8")) for path in args.from_json]
        report([row for run in runs for row in run["rows"]], next((r["rq_kmeans"] for r in runs if r["rq_kmeans"]),
                                                                   None))
        return
    if args.threads:
        set_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    print("ms per query (text encoder included on both sides); index size, build time and peak RSS growth for the "
          "generative index + trie and the faiss IVF index; share of the FLOP bound at the measured GEMM rate")
    print(HEADER, flush=True)
    for width in args.widths:
        vocab = VOCAB[width] + LEVELS * CODES + POSITION_TOKENS
        generative = ViTT5DSIForConditionalGeneration(
            ViTT5DSIConfig.from_preset(width, variant="cross_attention", vocab_size=vocab)).eval()
        generative.generation_config.eos_token_id = EOS
        dense = ViTT5DSIDualEncoderModel(ViTT5DSIConfig.from_preset(width, variant="dual_encoder",
                                                                    vocab_size=VOCAB[width])).eval()
        gflops = gemm_gflops(generative.config.text_config.d_model)
        for n in args.sizes:
            if width == "base" and n > args.base_max_size:
                continue
            rows.extend(measure(width, n, args, (generative, dense), gflops))
        del generative, dense
    kmeans = rq_kmeans_cost(args.rq_kmeans_images, args.rq_kmeans_dim) if args.rq_kmeans_images else None
    print()
    report(rows, kmeans, table=False)
    with open(args.output_json, "w", encoding="utf-8") as f:
        json.dump({"rows": rows, "rq_kmeans": kmeans, "argv": sys.argv[1:],
                   "verdicts": [dict(zip(("target", "trie_ms", "bound_ms", "verdict"), v))
                                for v in verdicts(rows)]}, f, indent=2)


if __name__ == "__main__":
    main()
