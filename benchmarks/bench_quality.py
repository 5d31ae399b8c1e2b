#!/usr/bin/env python
"""Retrieval quality side by side: every model on the same collection with the same budget, one table.

    python benchmarks/bench_quality.py                              # 2,000 synthetic scenes of 1-2 objects
    python benchmarks/bench_quality.py --num_images 300             # the built-in demo's collection
    python benchmarks/bench_quality.py --karpathy_json dataset_flickr30k.json --image_dir flickr30k-images \\
        --extra "--num_index_images 10000 --num_eval_images 2000"

Each model is one run of run_dsi_image.py in its own process (the same seed, epochs, batch, widths and learning
rate schedule). Pseudo-query models also co-train captioning and write pseudo-queries at --pseudo_query_epochs,
so they take more steps per epoch: the table prints each run's steps and training seconds next to its metrics.
The dual encoder runs first; the rows "rq ids" and "dense semantic ids" build their ids from its image embeddings, and
every generative row is also re-ranked by it (`--rerank_with`, the rr columns; what `--dense_first` does in one
command, since its dense stage is this same run). Prints the table and writes it as JSON (--output_json): a list
of rows with `model`, the keys of all_results.json, `caption_bleu` and `train_seconds`. Held-out = captions of
images only ever indexed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SINGLE_OBJECT_SCENES = 576  # distinct one-object scenes the synthetic generator can draw
PSEUDO = ["--captioning_ratio", "0.5", "--pseudo_query_images", "uncaptioned"]
NO_PSEUDO = ["--captioning_ratio", "0"]  # explicit: on the demo collection, pseudo-queries are the default
DENSE = "{dense}"  # replaced by the dual encoder's output directory
FROM_DENSE = ["--semantic_embeddings", DENSE]
RQ = ["--docid_scheme", "rq", *FROM_DENSE]
TOWER = ["--docid_scheme", "semantic"]  # explicit: on the demo collection, rq ids from a dual encoder are the default
MODELS = {  # the dual encoder first: later rows read its embeddings
    "dual_encoder": ["--variant", "dual_encoder"],
    "cross_attention": ["--variant", "cross_attention", *TOWER, *NO_PSEUDO],
    "cross_attention + pseudo-queries": ["--variant", "cross_attention", *TOWER, *PSEUDO],
    "cross_attention + dense semantic ids": ["--variant", "cross_attention", *TOWER, *FROM_DENSE,
                                                        *NO_PSEUDO],
    "cross_attention + rq ids": ["--variant", "cross_attention", *RQ, *NO_PSEUDO],
    "cross_attention + rq ids + pseudo-queries": ["--variant", "cross_attention", *RQ, *PSEUDO],
    "codebook": ["--variant", "codebook", *TOWER, *NO_PSEUDO],
    "codebook + pseudo-queries": ["--variant", "codebook", *TOWER, *PSEUDO],
    "codebook + rq ids + pseudo-queries": ["--variant", "codebook", *RQ, *PSEUDO],
}
COLUMNS = [("index@1", "index_hits@1"), ("seen@1", "seen_hits@1"), ("seen@10", "seen_hits@10"),
           ("held-out@1", "eval_hits@1"), ("held-out@10", "eval_hits@10"), ("MRR@10", "eval_mrr@10"),
           ("rr seen@1", "seen_rerank_hits@1"), ("rr held@1", "eval_rerank_hits@1"),
           ("rr MRR@10", "eval_rerank_mrr@10"), ("BLEU", "caption_bleu"), ("steps", "train_steps"),
           ("train s", "train_seconds")]


def output_dir_of(name: str, args) -> str:
    return os.path.join(args.work_dir, "".join(c if c.isalnum() else "_" for c in name))


def demo_max_objects(args) -> int:
    """Objects per synthetic scene: one, like the demo, while there are enough distinct one-object scenes (576);
    else up to two (e.g. the default 2,000 images)."""
    if args.demo_max_objects is not None:
        return args.demo_max_objects
    return 1 if args.num_images <= SINGLE_OBJECT_SCENES else 2


def run(name: str, flags: list[str], args) -> dict:
    output_dir = output_dir_of(name, args)
    dense_dir = output_dir_of("dual_encoder", args)
    flags = [dense_dir if flag == DENSE else flag for flag in flags]
    if name != "dual_encoder" and os.path.isfile(os.path.join(dense_dir, "image_embeddings.safetensors")):
        flags += ["--rerank_with", dense_dir, "--rerank_weight", str(args.rerank_weight)]
    data = (["--karpathy_json", args.karpathy_json, "--image_dir", args.image_dir] if args.karpathy_json else
            ["--demo_num_images", str(args.num_images), "--demo_max_objects", str(demo_max_objects(args)),
             "--demo_dir", os.path.join(args.work_dir, "data")])
    command = [sys.executable, os.path.join(ROOT, "run_dsi_image.py"), *data, *flags, "--output_dir", output_dir,
               "--overwrite_output_dir", "True", "--num_train_epochs", str(args.epochs), "--seed", str(args.seed),
               "--per_device_train_batch_size", str(args.batch_size), "--model_size", args.model_size,
               "--semantic_max_leaf_size", str(args.semantic_max_leaf_size), "--save_strategy", "no",
               "--disable_tqdm", "True", *shlex.split(args.extra)]
    if "pseudo-queries" in name:
        command += ["--pseudo_query_epochs", args.pseudo_query_epochs, "--num_pseudo_queries",
                    str(args.num_pseudo_queries), "--pseudo_query_rows_per_image", str(args.pseudo_query_rows)]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
    with open(os.path.join(output_dir, "all_results.json"), encoding="utf-8") as f:
        metrics = json.load(f)
    with open(os.path.join(output_dir, "trainer_state.json"), encoding="utf-8") as f:
        steps = json.load(f)["global_step"]
    return {"model": name, **metrics, "caption_bleu": metrics.get("eval_caption_bleu"),
            "train_seconds": metrics.get("train_runtime"), "train_steps": steps,
            "wall_seconds": time.perf_counter() - start}


def table(rows: list[dict]) -> str:
    width = max(len(row["model"]) for row in rows) + 2
    lines = ["model".ljust(width) + "".join(f"{title:>12}" for title, _ in COLUMNS)]
    for row in rows:
        cells = []
        for _, key in COLUMNS:
            value = row.get(key)
            cells.append(f"{'-':>12}" if value is None else f"{value:>12.0f}" if key in (
                "train_steps", "train_seconds") else f"{value:>12.1f}" if key == "caption_bleu" else f"{value:>12.3f}")
        lines.append(row["model"].ljust(width) + "".join(cells))
    return "\n".join(lines)


def target_lines(by_name: dict[str, dict]) -> list[str]:
    """The issues' targets, each printed met or MISSED with its figures (nothing is hidden when missed)."""
    lines = []

    def check(label, value, bound):
        lines.append(f"target {label}: {value:.3f} vs {bound:.3f}: {'met' if value >= bound else 'MISSED'}")

    dense = by_name.get("dual_encoder")
    rq, rq_pseudo = by_name.get("cross_attention + rq ids"), by_name.get(
        "cross_attention + rq ids + pseudo-queries")
    if rq:
        check("rq ids: seen@1 >= 0.80", rq["seen_hits@1"], 0.80)
        check("rq ids: index@1 >= 0.95", rq["index_hits@1"], 0.95)
    if dense:
        for name in ("cross_attention + pseudo-queries", "codebook + pseudo-queries",
                     "cross_attention + rq ids + pseudo-queries"):
            if name in by_name:
                check(f"{name}: held-out@10 >= dual encoder's", by_name[name]["eval_hits@10"], dense["eval_hits@10"])
        if rq_pseudo:
            check("rq ids + pseudo-queries: held-out@1 >= dual encoder's", rq_pseudo["eval_hits@1"],
                  dense["eval_hits@1"])
    if rq_pseudo and "eval_rerank_hits@1" in rq_pseudo:
        check("rq ids + pseudo-queries, re-ranked: held-out@1 >= 0.75", rq_pseudo["eval_rerank_hits@1"], 0.75)
        if dense:
            check("re-ranked held-out@1 above the dual encoder alone", rq_pseudo["eval_rerank_hits@1"],
                  dense["eval_hits@1"])
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=2000, help="Synthetic scenes to draw (demo layout).")
    parser.add_argument("--demo_max_objects", type=int, choices=(1, 2, 3), default=None,
                        help="Objects per synthetic scene (default: 1 up to 576 images, else 2).")
    parser.add_argument("--karpathy_json", help="A real collection instead (with --image_dir).")
    parser.add_argument("--image_dir")
    parser.add_argument("--epochs", type=float, default=300)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--model_size", default="tiny")
    parser.add_argument("--semantic_max_leaf_size", type=int, default=10)
    parser.add_argument("--pseudo_query_epochs", default="60")
    parser.add_argument("--num_pseudo_queries", type=int, default=10)
    parser.add_argument("--pseudo_query_rows", type=int, default=10, help="Pseudo-query rows per image per epoch.")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--rerank_weight", type=float, default=0.5, help="--rerank_weight of the rr columns.")
    parser.add_argument("--models", default=",".join(MODELS), help="Comma-separated subset of: " + ", ".join(MODELS))
    parser.add_argument("--extra", default="", help="More run_dsi_image.py flags for every run (one string).")
    parser.add_argument("--work_dir", default="bench_quality_runs")
    parser.add_argument("--output_json", default="bench_quality.json")
    args = parser.parse_args()
    names = [name.strip() for name in args.models.split(",")]
    unknown = [name for name in names if name not in MODELS]
    if unknown:
        parser.error(f"unknown --models {unknown}; choose from {list(MODELS)}")
    needs_dense = [name for name in names if DENSE in MODELS[name]]
    if needs_dense and "dual_encoder" not in names and not os.path.isdir(output_dir_of("dual_encoder", args)):
        parser.error(f"{needs_dense} build ids from the dual encoder: include dual_encoder in --models")
    names.sort(key=lambda name: name != "dual_encoder")
    rows = []
    for name in names:
        rows.append(run(name, MODELS[name], args))
        print(f"done: {name} ({rows[-1]['wall_seconds']:.0f} s)", file=sys.stderr, flush=True)
    collection = args.karpathy_json or f"{args.num_images} synthetic scenes"
    print(f"\n{collection}, {args.epochs:g} epochs, batch {args.batch_size}, {args.model_size} widths, seed {args.seed}")
    print(table(rows))
    for line in target_lines({row["model"]: row for row in rows}):
        print(line)
    with open(args.output_json, "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
