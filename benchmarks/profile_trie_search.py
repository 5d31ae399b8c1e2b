#!/usr/bin/env python
"""Where the time of one generative query batch goes, in the trie beam search (`search="trie"`) and in
`model.generate`: the T5 encoder, the decoder layers, the LM head, the trie's candidate lists, and the rest
(log-softmax, top-k, cache reordering, decoding ids back to images). Beside them, the dual encoder's text encoder
and a faiss IVF search over N random embeddings (--ivf_* as in bench_retrieval_latency; sqrt(N) lists by
default). Random weights, rq ids of 4 levels x 256 codes (`bench_retrieval_latency.rq_table`), 10 beams, 12-token
queries. The parts are timed with forward hooks and wrappers over `--repeats` rounds in which the three searches
alternate, so a change in the machine's load hits all of them; in each round each search runs
`--calls_per_round` times back to back (the round's time is their median), and the ratios are medians over
rounds.

    python benchmarks/profile_trie_search.py --width tiny --num_images 100000 --batches 1 32 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_retrieval_latency import (CODES, EOS, K, LEVELS, POSITION_TOKENS, QUERY_TOKENS, VOCAB,  # noqa: E402
                                     build_generative_index, dense_indexes, set_threads)

from vit_t5_dsi import ViTT5DSIConfig, ViTT5DSIDualEncoderModel, ViTT5DSIForConditionalGeneration  # noqa: E402
from vit_t5_dsi.checkpoint.id_trie import IdTrie  # noqa: E402
from vit_t5_dsi.checkpoint.modeling_blocks import T5DecoderSteps  # noqa: E402
from vit_t5_dsi.checkpoint.ranking import rank_by_generation  # noqa: E402


def timed_parts(model):
    """Forward hooks and wrappers that add each part's seconds into a dict."""
    spent, started = defaultdict(float), {}
    language_model = model.language_model
    for name, module in [("encoder", language_model.encoder), ("decoder layers", language_model.decoder),
                         ("LM head", language_model.lm_head)]:
        module.register_forward_pre_hook(lambda m, a, name=name: started.__setitem__(name, time.perf_counter()))
        module.register_forward_hook(lambda m, a, o, name=name: spent.__setitem__(
            name, spent[name] + time.perf_counter() - started[name]))
    candidates = IdTrie.candidate_table

    def timed_candidates(*args):
        start = time.perf_counter()
        out = candidates(*args)
        spent["trie candidates"] += time.perf_counter() - start
        return out

    IdTrie.candidate_table = timed_candidates
    # the trie search runs T5's decoder through T5DecoderSteps, not the decoder module: its layers are the step's
    # time less the LM head's, which the hook above counts
    decoder_step = T5DecoderSteps.step

    def timed_step(self, tokens):
        head_before, start = spent["LM head"], time.perf_counter()
        logits = decoder_step(self, tokens)
        spent["decoder layers"] += time.perf_counter() - start - (spent["LM head"] - head_before)
        return logits

    T5DecoderSteps.step = timed_step
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", default="tiny", choices=list(VOCAB))
    parser.add_argument("--num_images", type=int, default=100_000)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--ivf_lists_per_sqrt_n", type=float, default=1.0, help="the dense arm's faiss IVF index")
    parser.add_argument("--ivf_training_points_per_list", type=int, default=64)
    parser.add_argument("--ivf_nprobe", type=int, default=32)
    parser.add_argument("--skip_dense", action="store_true", help="time the two generative searches only")
    parser.add_argument("--calls_per_round", type=int, default=3,
                        help="back-to-back calls of each search per round; the round's time is their median (one "
                             "call right after another search also pays for that search's memory churn)")
    args = parser.parse_args()
    if args.threads:
        set_threads(args.threads)
    torch.manual_seed(0)
    vocab = VOCAB[args.width] + LEVELS * CODES + POSITION_TOKENS
    model = ViTT5DSIForConditionalGeneration(ViTT5DSIConfig.from_preset(args.width, vocab_size=vocab)).eval()
    model.generation_config.eos_token_id = EOS
    index, _ = build_generative_index(args.num_images, "rq", VOCAB[args.width])
    dense = ViTT5DSIDualEncoderModel(ViTT5DSIConfig.from_preset(args.width, variant="dual_encoder",
                                                                vocab_size=VOCAB[args.width])).eval()
    if not args.skip_dense:
        embeddings = torch.nn.functional.normalize(torch.randn(args.num_images, dense.text_projection.out_features),
                                                   dim=1)
        ivf = dense_indexes(embeddings.numpy(), args)["faiss_ivf"][0]
        del embeddings

    def search(name, queries):
        if name == "dense (faiss IVF)":
            with torch.no_grad():
                return ivf.search(dense.encode_texts(queries).numpy(), K)
        return rank_by_generation(model, index, K, input_ids=queries, search=name)

    spent = timed_parts(model)
    for batch in args.batches:
        queries = torch.randint(3, 1000, (batch, QUERY_TOKENS))
        totals, every_call = defaultdict(list), defaultdict(list)
        names = ("trie", "generate") + (() if args.skip_dense else ("dense (faiss IVF)",))
        parts = {name: defaultdict(float) for name in names}
        for name in parts:
            search(name, queries)  # warm-up
        for _ in range(args.repeats):  # the searches alternate, so a change in the machine's load hits all of them
            for name in parts:
                calls = []
                for _ in range(args.calls_per_round):  # back to back, as a service runs one search
                    spent.clear()
                    start = time.perf_counter()
                    search(name, queries)
                    calls.append(time.perf_counter() - start)
                    every_call[name].append(calls[-1])
                    for part, seconds in spent.items():
                        parts[name][part] += seconds / (args.repeats * args.calls_per_round)
                totals[name].append(statistics.median(calls))
        for name, timed in parts.items():
            total, mean = statistics.median(totals[name]), statistics.mean(every_call[name])
            if timed:  # the generative searches: what the hooks did not see is the search's own work
                timed["rest (softmax, top-k, cache, bookkeeping)"] = mean - sum(timed.values())
            print(f"{args.width}, N = {args.num_images:,}, batch {batch}, {name}: {1000 * total:.1f} ms per batch "
                  f"(median), {1000 * total / batch:.2f} ms per query")
            for part, seconds in timed.items():
                print(f"  {part:<44}{1000 * seconds:>9.2f} ms  {100 * seconds / mean:>5.1f}%")
        for slower, faster in (("generate", "trie"), ("trie", "dense (faiss IVF)"))[:len(names) - 1]:
            ratio = statistics.median([a / b for a, b in zip(totals[slower], totals[faster])])
            print(f"  {slower} / {faster}, median over {args.repeats} alternating rounds: {ratio:.2f}x")


if __name__ == "__main__":
    main()
