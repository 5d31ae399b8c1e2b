#!/usr/bin/env python
"""Draw the figures of docs/ from the measurements recorded under docs/figures/ (one PNG per JSON file).

    pip install -e ".[bench]"                      # matplotlib
    python benchmarks/plot_figures.py              # every docs/figures/*.json -> docs/figures/*.png

Each JSON file names the command that produced its figures ("command") and when they were measured
("measured"). A training run's curve comes from its trainer_state.json:

    accelerate launch run_dsi_image.py --eval_strategy steps --eval_steps 100 --output_dir dsi_demo_curve
    python benchmarks/plot_figures.py --from_trainer_state dsi_demo_curve/trainer_state.json --name hits_vs_steps

The second command writes docs/figures/hits_vs_steps.json (the run's losses and every periodic evaluation, with
the pseudo-query refresh step read from protocol.json beside it), then draws every figure again.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

FIGURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "figures")
MIB = 2 ** 20
LABELS = {"seen_hits@1": "seen Hits@1", "eval_hits@1": "held-out Hits@1", "eval_hits@10": "held-out Hits@10",
          "seen_rerank_hits@1": "re-ranked seen Hits@1", "eval_rerank_hits@1": "re-ranked held-out Hits@1",
          "seen_hits@10": "seen Hits@10", "index_hits@1": "index Hits@1", "eval_seen_hits@1": "seen Hits@1",
          "eval_seen_rerank_hits@1": "re-ranked seen Hits@1", "eval_index_hits@1": "index Hits@1"}


def footer(fig, data: dict, text: str | None = None) -> None:
    text = textwrap.fill(text or f"command: {data['command']}", 170)
    fig.text(0.01, 0.005, text, fontsize=6.5, color="0.35", ha="left", va="bottom")


def title(text: str, width: int = 95) -> str:
    return textwrap.fill(text, width)


def bars(data: dict, path: str) -> None:
    """Grouped horizontal bars: one group per row, one bar per metric."""
    rows, metrics = data["rows"], data["metrics"]
    height = 0.8 / len(metrics)
    fig, ax = plt.subplots(figsize=(9, 0.75 * len(rows) + 1.6))
    for m, metric in enumerate(metrics):
        ys = [len(rows) - 1 - i + (len(metrics) / 2 - m - 0.5) * height for i in range(len(rows))]
        values = [row.get(metric) for row in rows]
        shown = [(y, v) for y, v in zip(ys, values) if v is not None]
        ax.barh([y for y, _ in shown], [v for _, v in shown], height=height, label=LABELS.get(metric, metric))
        for y, v in shown:
            ax.text(v + 0.005, y, f"{v:.3f}", va="center", fontsize=7)
    ax.set_yticks(range(len(rows)), [row["label"] for row in reversed(rows)], fontsize=8)
    ax.set_xlim(0, 1.08)
    ax.set_xlabel("share of queries")
    fig.suptitle(title(data["figure"], 110), fontsize=9)
    ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(metrics), frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    footer(fig, data)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def latency(data: dict, path: str) -> None:
    """ms per query against N, per width; batch 1 solid, batch 32 dashed; plus memory against N."""
    series = {"generative_ms_per_query": "generative (generate + trie constraint)",
              "trie_ms_per_query": "generative (trie beam search)", "dense_matmul_ms_per_query": "dense, matmul",
              "faiss_flat_ms_per_query": "dense, faiss flat", "faiss_ivf_ms_per_query": "dense, faiss IVF"}
    widths = sorted({row["width"] for row in data["rows"]}, key=["tiny", "small", "base"].index)
    fig, axes = plt.subplots(1, len(widths), figsize=(5 * len(widths), 4.8), squeeze=False)
    for ax, width in zip(axes[0], widths):
        for (key, label), colour in zip(series.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
            for batch, style in ((1, "-"), (32, "--")):
                rows = [r for r in data["rows"] if r["width"] == width and r["batch"] == batch and key in r]
                if not rows:
                    continue
                ax.plot([r["num_images"] for r in rows], [r[key] for r in rows], style, marker="o", ms=3,
                        color=colour, label=f"{label}, batch {batch}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("images in the collection (N)")
        ax.set_ylabel("ms per query")
        ax.set_title(f"{width} widths", fontsize=9)
        ax.grid(True, which="major", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, ncol=4, loc="lower center", bbox_to_anchor=(0.5, 0.04), frameon=False)
    fig.suptitle("Retrieval latency against N (" + data["measured"][:10] + ", 2-core CPU; 10 beams)", fontsize=10)
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    footer(fig, data)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def index_memory(data: dict, path: str) -> None:
    """Memory against N: dense embeddings and the old trie (bench_retrieval_latency), the CSR index (this file)."""
    latency_rows = data["latency_rows"]  # the 2026-11-28 latency run's memory columns (dense embeddings, old trie)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for width, style in (("tiny", "-"), ("base", "--")):
        rows = [r for r in latency_rows if r["width"] == width and r["batch"] == 1]
        ax.plot([r["num_images"] for r in rows], [r["dense_embeddings_mb"] for r in rows], style, marker="o", ms=3,
                color="C1", label=f"dense float32 embeddings, {width} (d={64 if width == 'tiny' else 768})")
    rows = [r for r in latency_rows if r["width"] == "tiny" and r["batch"] == 1]
    ax.plot([r["num_images"] for r in rows], [r["trie_mb"] for r in rows], ":", marker="s", ms=3, color="C0",
            label="decoding trie before the CSR trie (2026-11-28)")
    now = [r for r in data["rows"] if r["code"] == "now"]
    points = [(r["num_images"], r["constraint_bytes_per_image"] * r["num_images"] / MIB, "CSR trie alone")
              for r in now if "constraint_bytes_per_image" in r]
    points += [(r["num_images"], r["index_bytes_per_image"] * r["num_images"] / MIB, "index columns alone")
               for r in now if "index_bytes_per_image" in r]
    points += [(r["num_images"], r["index_and_constraint_bytes_per_image"] * r["num_images"] / MIB,
                "index + CSR trie") for r in now if "index_and_constraint_bytes_per_image" in r]
    for (n, mb, label), marker in zip(points, ("v", "^", "D")):
        ax.plot([n], [mb], marker, color="C2", ms=7, label=f"{label}, now ({mb:.0f} MB at {n:,})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("images in the collection (N)")
    ax.set_ylabel("MB (MiB) in memory")
    ax.set_title("Memory of the search structures against N", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    footer(fig, data, "commands: python benchmarks/bench_retrieval_latency.py; python benchmarks/bench_index_memory.py")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def training_curve(data: dict, path: str) -> None:
    """Loss (and, when the run evaluated periodically, Hits@k) against steps, the pseudo-query refresh marked."""
    losses = [r for r in data["rows"] if "loss" in r]
    evals = [r for r in data["rows"] if any("hits@" in k for k in r)]
    panels = 2 if evals else 1
    fig, axes = plt.subplots(panels, 1, figsize=(8, 3.2 * panels + 0.4), sharex=True, squeeze=False)
    ax = axes[0][0]
    ax.plot([r["step"] for r in losses], [r["loss"] for r in losses], color="C0")
    ax.set_yscale("log")
    ax.set_ylabel("training loss")
    if evals:
        hax = axes[1][0]
        # logged during training, the seen and index sets carry the eval_ group prefix (DSITrainer.log)
        keys = [k for k in ("eval_hits@1", "eval_hits@10", "eval_rerank_hits@1", "seen_hits@1", "eval_seen_hits@1",
                            "eval_seen_rerank_hits@1", "index_hits@1", "eval_index_hits@1")
                if any(k in r for r in evals)]
        for key in keys:
            rows = [r for r in evals if key in r]
            hax.plot([r["step"] for r in rows], [r[key] for r in rows], marker="o", ms=3, label=LABELS.get(key, key))
        hax.set_ylabel("Hits@k")
        hax.set_ylim(0, 1.02)
        hax.legend(fontsize=7)
    for row in axes:
        row[0].grid(True, alpha=0.3)
        for refresh in data.get("pseudo_query_refreshes", []):
            row[0].axvline(refresh["step"], color="C3", ls="--", lw=1)
    refreshes = data.get("pseudo_query_refreshes", [])
    if refreshes:
        first = refreshes[0]
        ax.annotate(f"pseudo-queries written (epoch {first['epoch']}, step {first['step']}): "
                    f"{first.get('kept', '?')} kept of {first.get('written', '?')}; captioning stops",
                    xy=(first["step"], ax.get_ylim()[1]), xytext=(5, -12), textcoords="offset points", fontsize=7,
                    color="C3", va="top")
    axes[-1][0].set_xlabel("training step")
    final = data.get("final")
    heading = title(data["figure"], 110)
    if final:
        heading += "\n" + title("final: " + ", ".join(f"{LABELS.get(k, k)} {v:.3f}" for k, v in final.items()), 110)
    axes[0][0].set_title(heading, fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    footer(fig, data)
    fig.savefig(path, dpi=110)
    plt.close(fig)


DRAW = {"bars": bars, "latency": latency, "index_memory": index_memory, "training_curve": training_curve}


def from_trainer_state(state_path: str, name: str, run_command: str | None = None) -> str:
    """docs/figures/NAME.json from a run's trainer_state.json (losses, periodic evaluations, refresh steps)."""
    state = json.load(open(state_path, encoding="utf-8"))
    rows = []
    for entry in state["log_history"]:
        kept = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in entry.items()
                if k in ("step", "epoch", "loss") or "hits@" in k or "mrr@" in k}
        if len(kept) > 2:
            rows.append(kept)
    refreshes = []
    protocol_path = os.path.join(os.path.dirname(state_path), "protocol.json")
    if os.path.exists(protocol_path):
        pq = json.load(open(protocol_path, encoding="utf-8")).get("pseudo_queries") or {}
        steps = [int(s) for s in re.findall(r"step (\d+)", str(pq.get("source", "")))]
        for epoch, step in zip(pq.get("epochs", []), steps):
            refreshes.append({"epoch": epoch, "step": step, "written": pq.get("filter_written"),
                              "kept": pq.get("filter_kept")})
    data = {"kind": "training_curve", "figure": f"training curve of {os.path.dirname(state_path) or '.'}",
            "command": (f"{run_command}; then " if run_command else "") +
                       f"python benchmarks/plot_figures.py --from_trainer_state {state_path} --name {name}",
            "measured": "log_history of " + state_path, "pseudo_query_refreshes": refreshes, "rows": rows}
    path = os.path.join(FIGURES, f"{name}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    evals = sum(any("hits@" in k for k in r) for r in rows)
    print(f"wrote {path}: {len(rows)} log entries, {evals} with Hits@k" +
          ("" if evals else " (none: the run evaluated only at the end; pass --eval_strategy steps --eval_steps N)"))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from_trainer_state", metavar="PATH", help="First turn this trainer_state.json into "
                        "docs/figures/NAME.json (a training curve).")
    parser.add_argument("--name", default="hits_vs_steps", help="Name of that figure (default hits_vs_steps).")
    parser.add_argument("--run_command", default=None, help="The command that made that run, shown under the figure.")
    args = parser.parse_args()
    if args.from_trainer_state:
        from_trainer_state(args.from_trainer_state, args.name, args.run_command)
    for source in sorted(glob.glob(os.path.join(FIGURES, "*.json"))):
        data = json.load(open(source, encoding="utf-8"))
        target = source[:-len(".json")] + ".png"
        DRAW[data["kind"]](data, target)
        print(f"{os.path.relpath(target)}  <- {data['command'][:100]}")
    if not os.path.exists(os.path.join(FIGURES, "hits_vs_steps.json")):
        print("hits_vs_steps.png: no data yet; make it with\n"
              "  accelerate launch run_dsi_image.py --eval_strategy steps --eval_steps 100 "
              "--output_dir dsi_demo_curve\n"
              "  python benchmarks/plot_figures.py --from_trainer_state dsi_demo_curve/trainer_state.json "
              "--name hits_vs_steps")


if __name__ == "__main__":
    main()
