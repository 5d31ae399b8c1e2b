#!/usr/bin/env python
"""The web app under load: 20 concurrent clients send 1,000 text and image queries through Gradio's queue.

Starts the app (`python -m vit_t5_dsi.search.app --model MODEL`) (its defaults: queue concurrency 1, re-ranking with the checkpoint's dual
encoder when it has one), asks every distinct query once, one at a time, for the expected answers, then lets
`--clients` gradio_client clients send `--queries` queries at once (half captions from the demo's vocabulary,
half uploads of the collection's own images). Prints errors, answers that differ from the one-at-a-time ones, and
latency per query (submit to answer, queueing included) as p50 / p95 / max, for text and image queries apart.

    python benchmarks/bench_app_load.py --model dsi_demo_output          # 20 clients, 1,000 queries
    python benchmarks/bench_app_load.py --model CKPT --clients 4 --queries 40
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from app_browser import RunningApp  # noqa: E402

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
PLACES = ("top left", "top right", "bottom left", "bottom right", "center", "middle left")


def text_queries(n: int) -> list[str]:
    combos = itertools.product(("a small", "a large"), COLOURS, SHAPES, PLACES)
    return [f"{size} {colour} {shape} in the {place}" for size, colour, shape, place in itertools.islice(combos, n)]


def image_queries(model: str, n: int, image_dir: str | None = None) -> list[str]:
    with open(os.path.join(model, "image_index.json")) as f:
        index = json.load(f)
    files = [os.path.join(image_dir or index["image_root"], name) for name in index["image_files"] if name]
    return files[:n]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dsi_demo_output")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--distinct", type=int, default=100, help="Distinct queries of each kind.")
    parser.add_argument("--top_k", type=int, default=5)
    parser.add_argument("--image_dir", default=None, help="The collection's images, when they moved (the app's).")
    parser.add_argument("--app_args", nargs=argparse.REMAINDER, default=[],
                        help="Passed on to the app (e.g. --rerank_with none, --concurrency_limit 2).")
    args = parser.parse_args()
    from gradio_client import Client, handle_file

    texts, images = text_queries(args.distinct), image_queries(args.model, args.distinct, args.image_dir)
    app_args = args.app_args + (["--image_dir", args.image_dir] if args.image_dir else [])
    distinct = [("text", q) for q in texts] + [("image", q) for q in images]
    workload = [distinct[i % len(distinct)] for i in range(args.queries)]  # alternating text / image halves

    def ask(client, kind, query):
        started = time.perf_counter()
        gallery, message = (client.predict(query, None, args.top_k, api_name="/search") if kind == "text" else
                            client.predict("", handle_file(query), args.top_k, api_name="/search"))
        answer = [item["caption"] for item in gallery]
        if len(answer) != args.top_k:
            raise RuntimeError(f"{len(answer)} results: {message}")
        return answer, time.perf_counter() - started, message

    with RunningApp(args.model, *app_args, timeout=600) as app:
        client = Client(app.url, verbose=False)
        expected, sequential, reranked = {}, [], False
        for kind, query in distinct:
            expected[(kind, query)], seconds, message = ask(client, kind, query)
            sequential.append(seconds)
            reranked |= "re-ranked" in message
        latencies = {"text": [], "image": []}
        errors, mismatches, lock = [], [], threading.Lock()
        share = [workload[i::args.clients] for i in range(args.clients)]

        def user(items):
            own = Client(app.url, verbose=False)
            for kind, query in items:
                try:
                    answer, seconds, _ = ask(own, kind, query)
                except Exception as err:  # noqa: BLE001 - counted
                    with lock:
                        errors.append(f"{kind} {query!r}: {err!r}")
                    continue
                with lock:
                    latencies[kind].append(seconds)
                    if answer != expected[(kind, query)]:
                        mismatches.append((kind, query))

        started = time.perf_counter()
        threads = [threading.Thread(target=user, args=(items,)) for items in share]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
        still_up = app.process.poll() is None

    every = latencies["text"] + latencies["image"]
    print(f"\n{args.model}: {args.clients} clients, {args.queries} queries ({len(texts)} distinct captions, "
          f"{len(images)} distinct images, top-{args.top_k}), text queries "
          f"{'re-ranked by the dual encoder' if reranked else 'not re-ranked'}; the app {' '.join(app_args)}\n")
    print("| queries | answered | errors | differ from one at a time | p50 s | p95 s | max s | queries/s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, values in (("text", latencies["text"]), ("image", latencies["image"]), ("all", every)):
        if values:
            differ = sum(1 for kind, _ in mismatches if name in ("all", kind))
            err = sum(1 for e in errors if name == "all" or e.startswith(name))
            print(f"| {name} | {len(values)} | {err} | {differ} | {statistics.median(values):.2f} | "
                  f"{percentile(values, 0.95):.2f} | {max(values):.2f} | "
                  + (f"{len(values) / wall:.1f} |" if name == "all" else "- |"))
    print(f"| one at a time ({len(sequential)} distinct) | {len(sequential)} | 0 | - | "
          f"{statistics.median(sequential):.2f} | {percentile(sequential, 0.95):.2f} | {max(sequential):.2f} | "
          f"{len(sequential) / sum(sequential):.1f} |")
    print(f"\nwall {wall:.0f} s; server up afterwards: {still_up}")
    for line in errors[:5]:
        print("error:", line)
    return 0 if not errors and not mismatches and still_up else 1


if __name__ == "__main__":
    sys.exit(main())
