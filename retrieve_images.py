#!/usr/bin/env python
"""Print the top-k indexed images for each text query, from a checkpoint written by run_dsi_image.py.

    python retrieve_images.py --model dsi_demo_output --k 10 "a large red circle in the top left"
"""

from __future__ import annotations

import argparse
import json
import sys

from vit_t5_dsi.retriever import DSIRetriever


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("queries", nargs="*", help="Text queries; with none, one query per line from stdin.")
    parser.add_argument("--model", required=True, help="Checkpoint directory or Hub id (run_dsi_image.py output).")
    parser.add_argument("--k", type=int, default=10, help="Images to return per query (beams).")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available).")
    parser.add_argument("--rerank_with", default=None,
                        help="A dual-encoder checkpoint that re-ranks a generative model's top-k (e.g. the "
                             "dual_encoder folder a --dense_first run leaves in its output directory).")
    parser.add_argument("--rerank_weight", type=float, default=0.5,
                        help="Weight of the dense score against the generative one, in [0, 1].")
    parser.add_argument("--json", action="store_true", help="Print one JSON object per query instead of a table.")
    args = parser.parse_args(argv)
    queries = args.queries or [line.strip() for line in sys.stdin if line.strip()]
    if not queries:
        parser.error("give at least one query (arguments or stdin)")
    try:
        retriever = DSIRetriever.from_pretrained(args.model, device=args.device, rerank_with=args.rerank_with,
                                                 rerank_weight=args.rerank_weight)
    except ValueError as err:
        parser.error(str(err))
    for query, hits in zip(queries, retriever.retrieve(queries, k=args.k)):
        if args.json:
            print(json.dumps({"query": query, "results": [{"image": key, "score": score} for key, score in hits]}))
            continue
        print(f"\n{query}")
        for rank, (key, score) in enumerate(hits, 1):
            print(f"  {rank:>2}. {key}  ({score:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
