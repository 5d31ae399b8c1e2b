#!/usr/bin/env python
"""Adding images to a trained checkpoint against retraining on the whole collection (issue 23).

    python benchmarks/bench_incremental.py --work_dir bench_incremental          # the demo's budget
    python benchmarks/bench_incremental.py --work_dir bench_quick --quick        # a few minutes, for a smoke test

The demo collection (300 synthetic scenes, 60 held out) with 20% of its images *withheld* entirely (drawn from the
training images: not indexed, no captions) gives two runs of the default recipe at the demo's budget:
- "before": the collection without the withheld images;
- "full retraining": the whole collection, the withheld images indexed and uncaptioned from the start (held out
  beside the demo's own held-out images), with exactly the same training captions as "before".
The withheld images are then added to "before" with `vit_t5_dsi.add_images`: once with ids and trie only
(`--update_steps 0`), once with the short update (its own pseudo-queries for the new images, replayed rows of the old
collection). Every checkpoint answers the same queries with the same code (`DSIRetriever`, 10 beams):
- new: every real caption of the withheld images (evaluation only; they never reach a training path);
- old held-out: every caption of the demo's held-out images;
- old seen: the held-out caption of each training image ("seen" queries of the before run's protocol).
Stages (`--stage prepare|train|update|report|all`) can be run one at a time; each reuses what the earlier wrote.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SEED = 42


def prepare(work: str, withheld_fraction: float, num_images: int) -> dict:
    """The demo scenes, the withheld images and the two Karpathy files (full.json, before.json)."""
    from vit_t5_dsi.data.synthetic_scenes import generate_scenes

    data = os.path.join(work, "data")
    if not os.path.exists(os.path.join(data, "dataset_synthetic.json")):
        generate_scenes(data, num_images, image_size=64, seed=SEED, max_objects=1, heldout_fraction=0.1)
    with open(os.path.join(data, "dataset_synthetic.json"), encoding="utf-8") as f:
        dataset = json.load(f)
    train = [i for i, entry in enumerate(dataset["images"]) if entry["split"] == "train"]
    rng = np.random.default_rng(SEED)
    withheld = sorted(rng.choice(train, size=round(withheld_fraction * num_images), replace=False).tolist())
    full = {"images": [dict(entry, split="test") if i in withheld else entry
                       for i, entry in enumerate(dataset["images"])]}
    before = {"images": [entry for i, entry in enumerate(dataset["images"]) if i not in withheld]}
    for name, content in (("full.json", full), ("before.json", before)):
        with open(os.path.join(work, name), "w", encoding="utf-8") as f:
            json.dump(content, f)
    new = [{"key": dataset["images"][i]["filename"], "path": os.path.join(data, "images",
                                                                          dataset["images"][i]["filename"]),
            "captions": [s["raw"] for s in dataset["images"][i]["sentences"]]} for i in withheld]
    with open(os.path.join(work, "withheld.json"), "w", encoding="utf-8") as f:
        json.dump(new, f)
    return {"withheld": len(withheld), "images": num_images}


def train(work: str, epochs: float, parallel: bool) -> dict:
    """The before run and the full retraining, with run_dsi_image.py's default recipe; wall times recorded."""
    images = os.path.join(work, "data", "images")
    commands = {}
    for name, data in (("before", "before.json"), ("full", "full.json")):
        out = os.path.join(work, name)
        if os.path.exists(os.path.join(out, "all_results.json")):
            continue
        commands[name] = [sys.executable, os.path.join(ROOT, "run_dsi_image.py"), "--karpathy_json",
                          os.path.join(work, data), "--image_dir", images, "--output_dir", out,
                          "--overwrite_output_dir", "--num_train_epochs", str(epochs), "--disable_tqdm", "True",
                          "--seed", str(SEED)]
    times_path = os.path.join(work, "train_seconds.json")
    times = json.load(open(times_path)) if os.path.exists(times_path) else {}
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    running = {}
    for name, command in commands.items():
        log = open(os.path.join(work, f"{name}.log"), "w")
        running[name] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), time.time())
        if not parallel:
            running[name][0].wait()
            times[name] = time.time() - running[name][1]
    for name, (process, start) in running.items():
        if process.wait() != 0:
            raise SystemExit(f"{name} run failed: see {work}/{name}.log")
        times.setdefault(name, time.time() - start)
    with open(times_path, "w") as f:
        json.dump(times, f)
    return times


def old_protocol(work: str):
    """The before run's protocol, rebuilt as run_dsi_image.py built it: training captions (replayed by the short
    update), seen queries and held-out queries of the old images."""
    from vit_t5_dsi.data.collection import load_karpathy
    from vit_t5_dsi.data.splits import build_dsi_splits

    collection = load_karpathy(os.path.join(work, "before.json"), os.path.join(work, "data", "images"))
    return build_dsi_splits(collection, None, None, 1, ("test", "val"), SEED)


def update(work: str, steps: int) -> dict:
    from vit_t5_dsi import add_images

    with open(os.path.join(work, "withheld.json"), encoding="utf-8") as f:
        new = json.load(f)
    splits = old_protocol(work)
    replay = os.path.join(work, "replay_captions.jsonl")
    with open(replay, "w", encoding="utf-8") as f:  # the before run's training captions, nothing else
        for key, caption in zip(splits.train_queries["image_key"][:], splits.train_queries["caption"][:]):
            f.write(json.dumps({"image_id": key, "caption": caption}) + "\n")
    results = {}
    for name, budget in (("added_no_training", 0), ("added_short_update", steps)):
        out = os.path.join(work, name)
        start = time.time()
        report = add_images(os.path.join(work, "before"), {item["key"]: item["path"] for item in new},
                            output_dir=out, overwrite_output_dir=True, update_steps=budget,
                            replay_captions=replay, seed=SEED)
        results[name] = {"seconds": time.time() - start, **report}
    with open(os.path.join(work, "update_results.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


def hits(checkpoint: str, queries: list[tuple[str, str]], rerank: bool, new_keys=frozenset()) -> dict[str, float]:
    """Generative (or dual-encoder re-ranked) Hits@1 and Hits@10 over every query, and the share of queries whose
    first answer is one of `new_keys` (an old query lost to a new image, rather than to another old one)."""
    import torch

    from vit_t5_dsi import DSIRetriever

    torch.set_num_threads(1)
    retriever = DSIRetriever.from_pretrained(checkpoint, device="cpu", rerank=rerank)
    ranked = retriever.retrieve([text for text, _ in queries], top_k=10)
    ranks = [next((r for r, (key, _) in enumerate(result) if key == gold), None)
             for result, (_, gold) in zip(ranked, queries)]
    return {"hits@1": float(np.mean([r == 0 for r in ranks])),
            "hits@10": float(np.mean([r is not None for r in ranks])), "queries": len(queries),
            "top1_new": float(np.mean([bool(result) and result[0][0] in new_keys for result in ranked])),
            # the first *old* image answered: did the model keep what it knew, new images set aside
            "hits@1_among_old": float(np.mean([next((key for key, _ in result if key not in new_keys), None) == gold
                                               for result, (_, gold) in zip(ranked, queries)]))}


def report(work: str) -> str:
    with open(os.path.join(work, "withheld.json"), encoding="utf-8") as f:
        new = json.load(f)
    splits = old_protocol(work)
    sets = {"new": [(c, item["key"]) for item in new for c in item["captions"]],
            "old held-out": list(zip(splits.eval_queries["caption"][:], splits.eval_queries["image_key"][:])),
            "old seen": list(zip(splits.seen_queries["caption"][:], splits.seen_queries["image_key"][:]))}
    times = json.load(open(os.path.join(work, "train_seconds.json")))
    updates = json.load(open(os.path.join(work, "update_results.json")))
    rows = {}
    for name in ("full", "before", "added_no_training", "added_short_update"):
        checkpoint = os.path.join(work, name)
        rows[name] = {(set_name, rerank): hits(checkpoint, queries, rerank, {item["key"] for item in new})
                      for set_name, queries in sets.items() for rerank in (False, True)
                      if not (name == "before" and set_name == "new")}
    with open(os.path.join(work, "report.json"), "w") as f:
        json.dump({name: {f"{s}{' rerank' if r else ''}": v for (s, r), v in row.items()}
                   for name, row in rows.items()}, f, indent=2)
    labels = {"full": "full retraining (withheld images indexed from the start)", "before": "before (withheld left out)",
              "added_no_training": "added: ids + trie only", "added_short_update": "added + short update"}
    seconds = {"full": times["full"], "before": times["before"],
               "added_no_training": updates["added_no_training"]["seconds"],
               "added_short_update": updates["added_short_update"]["seconds"]}
    lines = ["| checkpoint | new @1 | new @10 | new @1 re-ranked | old held-out @1 | old held-out @10 | old seen @1 "
             "| old seen @10 | seconds |", "|---|---|---|---|---|---|---|---|---|"]

    def cell(row, key):
        return "-" if key not in row else f"{row[key]['hits@1']:.3f}"

    for name, row in rows.items():
        new_cells = ("-", "-", "-") if ("new", False) not in row else (
            f"{row[('new', False)]['hits@1']:.3f}", f"{row[('new', False)]['hits@10']:.3f}",
            f"{row[('new', True)]['hits@1']:.3f}")
        lines.append(f"| {labels[name]} | {' | '.join(new_cells)} | {cell(row, ('old held-out', False))} | "
                     f"{row[('old held-out', False)]['hits@10']:.3f} | {cell(row, ('old seen', False))} | "
                     f"{row[('old seen', False)]['hits@10']:.3f} | {seconds[name]:.0f} |")
    full_new, added = rows["full"][("new", False)], rows["added_short_update"][("new", False)]
    zero = rows["added_no_training"][("new", False)]
    before = rows["before"]
    ratios = [
        f"new Hits@10, short update / full retraining: {added['hits@10'] / max(full_new['hits@10'], 1e-9):.2f} "
        f"(target >= 0.9); ids + trie only: {zero['hits@10'] / max(full_new['hits@10'], 1e-9):.2f}",
        f"new Hits@1, short update / full retraining: {added['hits@1'] / max(full_new['hits@1'], 1e-9):.2f} "
        f"(target >= 0.8); ids + trie only: {zero['hits@1'] / max(full_new['hits@1'], 1e-9):.2f}",
        "forgetting (Hits@1 before - after short update): old held-out "
        f"{before[('old held-out', False)]['hits@1'] - rows['added_short_update'][('old held-out', False)]['hits@1']:+.3f}"
        f", old seen {before[('old seen', False)]['hits@1'] - rows['added_short_update'][('old seen', False)]['hits@1']:+.3f}"
        " (target <= 0.02 each); old queries whose first answer is now a new image: held-out "
        f"{rows['added_short_update'][('old held-out', False)]['top1_new']:.3f}, seen "
        f"{rows['added_short_update'][('old seen', False)]['top1_new']:.3f} (full retraining: "
        f"{rows['full'][('old held-out', False)]['top1_new']:.3f}, {rows['full'][('old seen', False)]['top1_new']:.3f})",
        "old queries' Hits@1 among old images only (new images set aside), before -> after short update: held-out "
        f"{before[('old held-out', False)]['hits@1_among_old']:.3f} -> "
        f"{rows['added_short_update'][('old held-out', False)]['hits@1_among_old']:.3f}, seen "
        f"{before[('old seen', False)]['hits@1_among_old']:.3f} -> "
        f"{rows['added_short_update'][('old seen', False)]['hits@1_among_old']:.3f}",
        f"time to add, short update included / full retraining: {seconds['added_short_update'] / seconds['full']:.3f} "
        f"(target <= 0.10)"]
    text = "\n".join(lines + [""] + ratios)
    with open(os.path.join(work, "report.md"), "w") as f:
        f.write(text + "\n")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="bench_incremental")
    parser.add_argument("--stage", choices=("prepare", "train", "update", "report", "all"), default="all")
    parser.add_argument("--quick", action="store_true", help="30 generative epochs instead of the demo's 150.")
    parser.add_argument("--epochs", type=float, default=None, help="Generative epochs of both runs (demo: 150).")
    parser.add_argument("--update_steps", type=int, default=None, help="Short update's steps.")
    parser.add_argument("--withheld_fraction", type=float, default=0.2)
    parser.add_argument("--num_images", type=int, default=300)
    parser.add_argument("--sequential", action="store_true", help="Train the two runs one after the other.")
    args = parser.parse_args()
    os.makedirs(args.work_dir, exist_ok=True)
    epochs = args.epochs or (30.0 if args.quick else 150.0)
    steps = args.update_steps if args.update_steps is not None else (60 if args.quick else 300)
    if args.stage in ("prepare", "all"):
        print(prepare(args.work_dir, args.withheld_fraction, args.num_images), flush=True)
    if args.stage in ("train", "all"):
        print(train(args.work_dir, epochs, not args.sequential), flush=True)
    if args.stage in ("update", "all"):
        print(json.dumps(update(args.work_dir, steps), indent=1), flush=True)
    if args.stage in ("report", "all"):
        print(report(args.work_dir), flush=True)


if __name__ == "__main__":
    main()
