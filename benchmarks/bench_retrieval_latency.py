#!/usr/bin/env python
"""How fast a query is answered, and with how much index memory, as the collection grows: generative retrieval
against dense search, side by side in one run.

For N in {1K, 10K, 100K, 1M} indexed images and batches of 1 and 32 caption queries (12 tokens each), per-query
latency of:
  generative: encode the query with T5's encoder, then constrained beam search (10 beams, 10 returned) over an
              N-id trie of rq ids (the recommended scheme; `--scheme` picks another);
  dense:      encode the query (T5 encoder, pooled, projected), then a brute-force matmul over N x d image
              embeddings and a top-10;
  faiss:      the same embeddings in a faiss flat (exact) and an IVF index (nlist = sqrt(N), nprobe 8), when
              faiss-cpu is installed (`pip install faiss-cpu`).
at `tiny` widths and at T5-base widths with T5's 32K vocabulary (random weights: speed does not depend on them).
Index memory: the trie's tables against the N x d float32 matrix. Prints one table, the N (if any) from which the
generative search answers faster than dense, and writes the rows as JSON (--output_json).

    python benchmarks/bench_retrieval_latency.py                        # tiny and base, 1K..1M (minutes)
    python benchmarks/bench_retrieval_latency.py --widths tiny --sizes 1000 10000
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_constrained_decoding import ID_SCHEMES  # noqa: E402

from vit_t5_dsi import ViTT5DSIConfig, ViTT5DSIDualEncoderModel, ViTT5DSIForConditionalGeneration  # noqa: E402
from vit_t5_dsi.checkpoint.id_trie import IdTrie, TrieConstrainedLogitsProcessor  # noqa: E402
from vit_t5_dsi.checkpoint.ranking import rank_by_similarity  # noqa: E402

PAD, EOS, QUERY_TOKENS, K = 0, 1, 12, 10
VOCAB = {"tiny": 4096, "base": 32128}


def trie_bytes(trie: IdTrie) -> int:
    return sum(value.nbytes for value in vars(trie).values() if isinstance(value, np.ndarray)) + sum(
        value.numel() * value.element_size() for value in vars(trie).values() if isinstance(value, torch.Tensor))


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def faiss_indexes(embeddings: np.ndarray):
    try:
        import faiss
    except ImportError:
        return {}
    flat = faiss.IndexFlatIP(embeddings.shape[1])
    flat.add(embeddings)
    nlist = max(1, int(np.sqrt(len(embeddings))))
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(embeddings.shape[1]), embeddings.shape[1], nlist,
                             faiss.METRIC_INNER_PRODUCT)
    ivf.train(embeddings[np.random.default_rng(0).choice(len(embeddings), min(len(embeddings), 50 * nlist),
                                                         replace=False)])
    ivf.add(embeddings)
    ivf.nprobe = 8
    return {"faiss_flat": flat, "faiss_ivf": ivf}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", nargs="+", default=["tiny", "base"], choices=list(VOCAB))
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000, 1_000_000])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--scheme", default="rq", choices=list(ID_SCHEMES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output_json", default="bench_retrieval_latency.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    print(f"{'width':<6}{'N':>10}{'batch':>6}{'gen ms/q':>10}{'dense ms/q':>11}{'flat ms/q':>10}{'ivf ms/q':>10}"
          f"{'trie MB':>9}{'dense MB':>10}  faster", flush=True)
    for width in args.widths:
        config = ViTT5DSIConfig.from_preset(width, variant="cross_attention", vocab_size=VOCAB[width])
        generative = ViTT5DSIForConditionalGeneration(config).eval()
        generative.generation_config.eos_token_id = EOS
        dense = ViTT5DSIDualEncoderModel(ViTT5DSIConfig.from_preset(width, variant="dual_encoder",
                                                                    vocab_size=VOCAB[width])).eval()
        dim = dense.text_projection.out_features
        for n in args.sizes:
            ids = ID_SCHEMES[args.scheme](n)
            trie = IdTrie(ids, EOS, PAD)
            embeddings = torch.nn.functional.normalize(torch.randn(n, dim), dim=1)
            faiss_by_name = faiss_indexes(embeddings.numpy())
            for batch in args.batches:
                queries = torch.randint(3, 1000, (batch, QUERY_TOKENS))

                @torch.no_grad()
                def generate():
                    generative.generate(input_ids=queries, num_beams=K, num_return_sequences=K,
                                        max_new_tokens=trie.max_length, do_sample=False, early_stopping="never",
                                        length_penalty=0.0, logits_processor=[TrieConstrainedLogitsProcessor(trie)])

                @torch.no_grad()
                def search(index=None):
                    text = dense.encode_texts(queries)
                    if index is None:
                        return rank_by_similarity(text, embeddings, K)
                    return index.search(text.numpy(), K)

                seconds = {"generative": median_seconds(generate, args.repeats),
                           "dense": median_seconds(search, args.repeats)}
                for name, index in faiss_by_name.items():
                    seconds[name] = median_seconds(lambda index=index: search(index), args.repeats)
                row = {"width": width, "num_images": n, "batch_size": batch, "scheme": args.scheme,
                       "ms_per_query": {name: 1000 * s / batch for name, s in seconds.items()},
                       "trie_mb": trie_bytes(trie) / 2 ** 20, "dense_mb": embeddings.numel() * 4 / 2 ** 20}
                fastest_dense = min(v for name, v in row["ms_per_query"].items() if name != "generative")
                row["generative_faster"] = row["ms_per_query"]["generative"] < fastest_dense
                rows.append(row)
                ms = row["ms_per_query"]
                print(f"{width:<6}{n:>10,}{batch:>6}{ms['generative']:>10.2f}{ms['dense']:>11.2f}"
                      f"{ms.get('faiss_flat', float('nan')):>10.2f}{ms.get('faiss_ivf', float('nan')):>10.2f}"
                      f"{row['trie_mb']:>9.1f}{row['dense_mb']:>10.1f}  "
                      f"{'generative' if row['generative_faster'] else 'dense'}", flush=True)
    print()
    for width in args.widths:
        for batch in args.batches:
            faster = [r["num_images"] for r in rows if r["width"] == width and r["batch_size"] == batch
                      and r["generative_faster"]]
            print(f"{width}, batch {batch}: generative answers faster than the fastest dense search at "
                  + (f"N = {', '.join(f'{n:,}' for n in faster)}" if faster else
                     "no N measured: dense wins at every size"))
    with open(args.output_json, "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
