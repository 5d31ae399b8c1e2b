#!/usr/bin/env python
"""Search a checkpoint written by run_dsi_image.py: the top-k indexed images for each text or image query.

    python retrieve_images.py --model dsi_demo_output --top_k 5 "a large red circle in the top left"
    python retrieve_images.py --model CKPT --image query.png --image_dir DIR --output results.jsonl
    python retrieve_images.py --model CKPT --export_embeddings embeddings.npy   # + embeddings.keys.txt

Text queries of a generative checkpoint are re-ranked by the dual encoder it carries (`dual_encoder/`, locally or
on the Hub) unless --no_rerank, as in Python, the pipeline and the app (docs/searching.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from vit_t5_dsi.search.retriever import DSIRetriever


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("queries", nargs="*", help="Text queries; with none (and no --image), one per line from stdin.")
    parser.add_argument("--model", required=True, help="Checkpoint directory or Hub id (run_dsi_image.py output).")
    parser.add_argument("--image", action="append", default=[], metavar="FILE",
                        help="An image file to search by (repeat for several); searched after the text queries.")
    parser.add_argument("--top_k", type=int, default=None, help="Images to return per query (default 10).")
    parser.add_argument("--k", type=int, default=None, help=argparse.SUPPRESS)  # the old name of --top_k
    parser.add_argument("--image_dir", default=None,
                        help="Folder holding the collection's images, when they are not where they were indexed "
                             "(the printed paths are looked up there).")
    parser.add_argument("--output", default=None, metavar="FILE.jsonl",
                        help="Also write one JSON object per query to this file: query, type, results "
                             "[{image_key, score, path}].")
    parser.add_argument("--json", action="store_true", help="Print those JSON objects instead of a table.")
    parser.add_argument("--no_rerank", action="store_true",
                        help="Keep the beam's order: do not re-rank with the checkpoint's dual_encoder/.")
    parser.add_argument("--rerank_with", default=None,
                        help="Re-rank with this dual-encoder checkpoint (directory, Hub id, or REPO/dual_encoder) "
                             "instead of the checkpoint's own dual_encoder/.")
    parser.add_argument("--rerank_weight", type=float, default=0.5,
                        help="Weight of the dense score against the generative one, in [0, 1].")
    parser.add_argument("--export_embeddings", default=None, metavar="FILE.npy",
                        help="Write the dual encoder's image embeddings (the checkpoint's own, or its re-ranker's) "
                             "to FILE.npy, one row per indexed image in index order, and their keys to "
                             "FILE.keys.txt (line i = row i): what --semantic_embeddings FILE.npy reads.")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available).")
    args = parser.parse_args(argv)
    if args.k is not None:
        if args.top_k is not None and args.top_k != args.k:
            parser.error(f"--k {args.k} and --top_k {args.top_k} disagree; --k is the old name of --top_k.")
        warnings.warn("--k is deprecated: use --top_k.", FutureWarning, stacklevel=2)
        args.top_k = args.k
    args.top_k = 10 if args.top_k is None else args.top_k
    if args.top_k < 1:
        parser.error(f"--top_k must be >= 1, got {args.top_k}.")
    if args.image_dir and not os.path.isdir(args.image_dir):
        parser.error(f"--image_dir {args.image_dir}: no such directory.")
    for path in args.image:
        if not os.path.isfile(path):
            parser.error(f"--image {path}: no such file.")
    if args.no_rerank and args.rerank_with:
        parser.error("--no_rerank and --rerank_with contradict each other.")
    if args.export_embeddings and not args.export_embeddings.endswith(".npy"):
        parser.error(f"--export_embeddings {args.export_embeddings}: name a .npy file.")
    args.parser = parser
    return args


def export_embeddings(retriever: DSIRetriever, path: str) -> str:
    """FILE.npy (float32, one row per indexed image, index order) and FILE.keys.txt; returns the keys file."""
    import numpy as np

    keys, embeddings = retriever.dense_image_embeddings()
    bad = next((key for key in keys if "\n" in key or "\r" in key), None)
    if bad is not None:
        raise ValueError(f"image key {bad!r} holds a line break: it cannot be written one per line.")
    keys_path = path[: -len(".npy")] + ".keys.txt"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.save(path, embeddings.astype(np.float32))
    with open(keys_path, "w", encoding="utf-8") as f:
        f.write("".join(f"{key}\n" for key in keys))
    return keys_path


def main(argv=None) -> int:
    args = parse_args(argv)
    parser = args.parser
    queries = list(args.queries)
    if not queries and not args.image and not args.export_embeddings:
        queries = [line.strip() for line in sys.stdin if line.strip()]
        if not queries:
            parser.error("give at least one query (arguments, --image FILE or stdin)")
    try:
        retriever = DSIRetriever.from_pretrained(args.model, device=args.device, rerank=False if args.no_rerank else
                                                 None, rerank_with=args.rerank_with, rerank_weight=args.rerank_weight,
                                                 image_dir=args.image_dir)
    except (OSError, ValueError) as err:
        parser.error(f"--model {args.model}: {err}")
    if args.export_embeddings:
        try:
            keys_path = export_embeddings(retriever, args.export_embeddings)
        except ValueError as err:
            hint = " (--no_rerank left its dual encoder unloaded)" if args.no_rerank else ""
            parser.error(f"--export_embeddings: {err}{hint}")
        print(f"Wrote {len(retriever.image_index)} image embeddings to {args.export_embeddings} and their keys to "
              f"{keys_path}.", file=sys.stderr)
    if not queries and not args.image:
        return 0
    records = []
    if queries:
        records += [{"query": query, "type": "text", "results": hits}
                    for query, hits in zip(queries, retriever.search(queries, top_k=args.top_k))]
    if args.image:
        from PIL import Image

        for path in args.image:
            try:
                with Image.open(path) as image:
                    hits = retriever.search(image.convert("RGB"), top_k=args.top_k)
            except OSError as err:
                parser.error(f"--image {path}: not a readable image ({err}).")
            records.append({"query": path, "type": "image", "results": hits})
    try:
        if args.output:
            os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        output = open(args.output, "w", encoding="utf-8") if args.output else None
    except OSError as err:
        parser.error(f"--output {args.output}: cannot write it ({err}).")
    try:
        for record in records:
            line = json.dumps(record, ensure_ascii=False)
            if output:
                output.write(line + "\n")
            if args.json:
                print(line)
                continue
            print(f"\n{record['query']}" + (" (image)" if record["type"] == "image" else ""))
            for rank, hit in enumerate(record["results"], 1):
                print(f"  {rank:>2}. {hit['image_key']}  {hit['score']:.3f}  {hit['path'] or '-'}")
    finally:
        if output:
            output.close()
    if not args.json:
        reranked = " (text queries re-ranked by the dual encoder)" if retriever.reranker is not None else ""
        print(f"\n{len(records)} queries, top {args.top_k}{reranked}.", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
