#!/usr/bin/env python
"""Re-score a finished generative run's queries under several ways of fusing it with its dual encoder, without
retraining: every variant costs seconds.

    python benchmarks/rescore_fusion.py --run /tmp/r21/base            # the demo run (its data flags: none)
    python benchmarks/rescore_fusion.py --run OUT --data "--karpathy_json X --image_dir Y"

For each query set (`seen`: held-out captions of training images; `eval`: captions of held-out images; `train`:
training captions, the only set any variant may choose a parameter on) it computes once, then caches in
`RUN/fusion_scores.npz`:
- the constrained beam (10 beams) the run's evaluation uses, with its sequence log-probabilities;
- the generative model's log-probability of *every* indexed image's id (teacher forcing, the same sum of token
  log-probabilities the beam scores are);
- the dual encoder's cosine similarity to every indexed image, and its learnt logit scale.
Then it prints Hits@1 / Hits@10 of each fusion variant on each set. Held-out and seen captions are only ever
measured: the parameters some variants fit (a weight, a temperature) are fitted on training captions alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _rows_to_eval(splits):
    return {"seen": splits.seen_queries, "eval": splits.eval_queries, "train": splits.train_queries}


@torch.no_grad()
def compute_scores(run: str, data_flags: list[str], batch_size: int = 16) -> dict[str, np.ndarray]:
    from transformers.modeling_outputs import BaseModelOutput

    from vit_t5_dsi.checkpoint.loading import load_dense_reranker, load_dsi_model
    from vit_t5_dsi.checkpoint.processing_vit_t5_dsi import ViTT5DSIProcessor
    from vit_t5_dsi.checkpoint.ranking import rank_by_generation
    from vit_t5_dsi.training.arguments import parse_args
    from vit_t5_dsi.training.run_steps import load_collection_and_splits

    torch.set_grad_enabled(False)
    _, data_args, training_args = parse_args([*data_flags, "--output_dir", os.path.join(run, "_rescore")])
    _, splits = load_collection_and_splits(data_args, training_args)
    model = load_dsi_model(run).eval()
    processor = ViTT5DSIProcessor.from_pretrained(run)
    dense = load_dense_reranker(os.path.join(run, "dual_encoder"))
    index = model.image_index
    images = dense.embeddings_for(index)  # (N, d), L2-normalised
    n = len(index)
    labels = [index.labels_for(key) for key in index.keys]
    width = max(map(len, labels))
    label_table = torch.full((n, width), -100, dtype=torch.long)
    for row, tokens in enumerate(labels):
        label_table[row, :len(tokens)] = torch.as_tensor(tokens)
    out = {"logit_scale": np.float32(dense.model.logit_scale.clamp(max=4.6052).exp().item())}
    for name, rows in _rows_to_eval(splits).items():
        keys, texts = rows["image_key"][:], rows["caption"][:]
        gold = index.positions_of(keys)
        beam_pos, beam_scores, gen_all, dense_all = [], [], [], []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            batch = processor(text=list(chunk))
            ranking = rank_by_generation(model, index, 10, input_ids=batch["input_ids"],
                                         attention_mask=batch["attention_mask"])
            beam_pos.append(ranking.positions)
            beam_scores.append(ranking.scores)
            queries = dense.model.encode_texts(batch["input_ids"], batch["attention_mask"]).float()
            dense_all.append((queries @ images.T).numpy())
            enc, mask, _ = model.encode(None, batch["input_ids"], batch["attention_mask"])
            for q in range(len(chunk)):
                states = enc.last_hidden_state[q:q + 1].expand(n, -1, -1)
                logits = model.language_model(encoder_outputs=BaseModelOutput(last_hidden_state=states),
                                              attention_mask=mask[q:q + 1].expand(n, -1),
                                              labels=label_table).logits
                logp = torch.log_softmax(logits.float(), -1)
                valid = label_table >= 0
                token_lp = logp.gather(-1, label_table.clamp(min=0)[..., None])[..., 0] * valid
                gen_all.append(token_lp.sum(1).numpy())
            print(f"{name}: {min(start + batch_size, len(texts))}/{len(texts)}", file=sys.stderr, flush=True)
        out[f"{name}_gold"] = np.asarray(gold)
        out[f"{name}_beam_pos"] = np.concatenate(beam_pos)
        out[f"{name}_beam_scores"] = np.concatenate(beam_scores)
        out[f"{name}_gen"] = np.stack(gen_all).astype(np.float32)
        out[f"{name}_dense"] = np.concatenate(dense_all).astype(np.float32)
    return out


# ----- fusions: each returns a (Q, N) score matrix (higher is better; -inf = not a candidate) -----------------
def log_softmax(x: np.ndarray) -> np.ndarray:
    finite = np.isfinite(x)
    m = np.where(finite, x, -np.inf).max(1, keepdims=True)
    z = np.where(finite, np.exp(np.where(finite, x - m, 0.0)), 0.0).sum(1, keepdims=True)
    return np.where(finite, x - m - np.log(z), -np.inf)


def candidates_mask(s, name, which, k=10):
    q, n = s[f"{name}_gen"].shape
    mask = np.zeros((q, n), dtype=bool)
    if which in ("beam", "union"):
        pos = s[f"{name}_beam_pos"]
        rows = np.repeat(np.arange(q), pos.shape[1])
        flat = pos.reshape(-1)
        mask[rows[flat >= 0], flat[flat >= 0]] = True
    if which in ("dense", "union"):
        top = np.argsort(-s[f"{name}_dense"], 1, kind="stable")[:, :k]
        mask[np.repeat(np.arange(q), k), top.reshape(-1)] = True
    if which == "all":
        mask[:] = True
    return mask


def fused(s, name, w, cands="beam", gen_temp=1.0, dense_scale=None, gen_key="gen"):
    """(1 - w) log_softmax(gen / T) + w log_softmax(scale * cos), both normalised over the candidates."""
    mask = candidates_mask(s, name, cands)
    scale = s["logit_scale"] if dense_scale is None else dense_scale
    gen = np.where(mask, s[f"{name}_{gen_key}"] / gen_temp, -np.inf)
    den = np.where(mask, scale * s[f"{name}_dense"], -np.inf)
    if w == 0:
        return log_softmax(gen) + 1e-9 * np.nan_to_num(den, neginf=0)
    if w == 1:
        return log_softmax(den) + 1e-9 * np.nan_to_num(gen, neginf=0)
    return (1 - w) * log_softmax(gen) + w * log_softmax(den)


def ranks_of(scores):
    """0-based rank of each column per row (stable: ties by index)."""
    order = np.argsort(-scores, 1, kind="stable")
    ranks = np.empty_like(order)
    ranks[np.arange(len(order))[:, None], order] = np.arange(order.shape[1])[None, :]
    return ranks


def rrf(s, name, cands="union", k=60, w=0.5):
    mask = candidates_mask(s, name, cands)
    rg, rd = ranks_of(s[f"{name}_gen"]), ranks_of(s[f"{name}_dense"])
    score = (1 - w) / (k + rg + 1) + w / (k + rd + 1)
    return np.where(mask, score, -np.inf)


def hits(scores, gold, k):
    order = np.argsort(-scores, 1, kind="stable")[:, :k]
    ok = np.isfinite(np.take_along_axis(scores, order, 1))
    return float(((order == gold[:, None]) & ok).any(1).mean())


def beam_hits(s, name, k):
    return float((s[f"{name}_beam_pos"][:, :k] == s[f"{name}_gold"][:, None]).any(1).mean())


def nll(scores, gold):
    lp = log_softmax(scores)
    return float(-np.mean(np.maximum(lp[np.arange(len(gold)), gold], -30.0)))


def fit_on_train(s, objective, grid):
    """The grid value with the best objective on TRAINING captions only (ties: the first, i.e. the smallest)."""
    best = None
    for value in grid:
        score = objective(value)
        if best is None or score > best[1] + 1e-12:
            best = (value, score)
    return best[0]


def variants(s):
    """name -> function(set name) -> (Q, N) scores. Parameters are fixed a priori or fitted on 'train'."""
    v = {
        "dense alone (all images)": lambda n: s[f"{n}_dense"],
        "generative alone, beam": lambda n: fused(s, n, 0.0, "beam"),
        "generative alone, exact over all ids": lambda n: s[f"{n}_gen"],
        "current: beam, w 0.5 (log-softmax fusion)": lambda n: fused(s, n, 0.5, "beam"),
        "beam, w 0.8": lambda n: fused(s, n, 0.8, "beam"),
        "beam, w 1 (dense order of the beam)": lambda n: fused(s, n, 1.0, "beam"),
        "union beam+dense top-10, w 0.5": lambda n: fused(s, n, 0.5, "union"),
        "all ids, w 0.5 (product of experts)": lambda n: fused(s, n, 0.5, "all"),
        "RRF k=60, union": lambda n: rrf(s, n, "union", 60),
        "RRF k=60, beam": lambda n: rrf(s, n, "beam", 60),
        "RRF k=1, union": lambda n: rrf(s, n, "union", 1),
    }
    grid = np.round(np.linspace(0, 1, 21), 2)
    g = s["train_gold"]
    w_train = fit_on_train(s, lambda w: -nll(fused(s, "train", w, "beam"), g), grid)
    v[f"beam, w fitted on training captions by NLL ({w_train:g})"] = lambda n: fused(s, n, w_train, "beam")
    w_train_u = fit_on_train(s, lambda w: -nll(fused(s, "train", w, "union"), g), grid)
    v[f"union, w fitted on training captions by NLL ({w_train_u:g})"] = lambda n: fused(s, n, w_train_u, "union")
    # temperatures: each model calibrated alone on training captions (NLL over all ids), then equal weights
    temps = np.exp(np.linspace(np.log(0.25), np.log(64), 41))
    t_gen = fit_on_train(s, lambda t: -nll(s["train_gen"] / t, g), temps)
    scales = np.exp(np.linspace(np.log(1), np.log(200), 41))
    c_den = fit_on_train(s, lambda c: -nll(c * s["train_dense"], g), scales)
    v[f"union, each model temperature-calibrated on training captions (T_gen {t_gen:.2f}, dense scale {c_den:.1f}), "
      "product"] = lambda n: (log_softmax(np.where(candidates_mask(s, n, "union"), s[f"{n}_gen"] / t_gen, -np.inf))
                              + log_softmax(np.where(candidates_mask(s, n, "union"), c_den * s[f"{n}_dense"],
                                                     -np.inf)))
    return v


def report(s) -> list[dict]:
    rows = []
    for label, fn in variants(s).items():
        row = {"variant": label}
        for name in ("seen", "eval", "train"):
            scores = fn(name)
            gold = s[f"{name}_gold"]
            row[f"{name}@1"], row[f"{name}@10"] = hits(scores, gold, 1), hits(scores, gold, 10)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="A finished generative run's output_dir (with dual_encoder/).")
    parser.add_argument("--data", default="", help="The run's data flags, one string (none for the demo).")
    parser.add_argument("--recompute", action="store_true")
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args()
    cache = os.path.join(args.run, "fusion_scores.npz")
    if args.recompute or not os.path.isfile(cache):
        np.savez(cache, **compute_scores(args.run, shlex.split(args.data)))
    s = dict(np.load(cache))
    for name in ("seen", "eval"):
        print(f"check {name}: beam Hits@1 {beam_hits(s, name, 1):.3f}, Hits@10 {beam_hits(s, name, 10):.3f}; "
              f"exact beam scores vs teacher-forced: max |diff| "
              f"{np.nanmax(np.abs(np.take_along_axis(s[f'{name}_gen'], np.maximum(s[f'{name}_beam_pos'], 0), 1) - s[f'{name}_beam_scores'])[s[f'{name}_beam_pos'] >= 0]):.2e}")
    rows = report(s)
    width = max(len(r["variant"]) for r in rows) + 2
    cols = ["seen@1", "seen@10", "eval@1", "eval@10", "train@1"]
    print("variant".ljust(width) + "".join(f"{c:>9}" for c in cols))
    for r in rows:
        print(r["variant"].ljust(width) + "".join(f"{r[c]:>9.3f}" for c in cols))
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
