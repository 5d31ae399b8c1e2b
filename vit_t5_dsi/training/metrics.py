"""Hits@k and MRR@k over ranked image positions, and `compute_metrics` builders for Seq2SeqTrainer.

Every query counts in the denominator: an invalid, missing or duplicated output is a miss, never a skipped
query. A duplicate occupies its slot; the gold image's rank is its first occurrence.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..checkpoint.image_index import ImageIndex


def gold_ranks(ranked: np.ndarray, gold: Sequence[int]) -> np.ndarray:
    """1-based rank of each query's gold position in its ranked list; 0 where it is absent."""
    ranked, gold = np.asarray(ranked), np.asarray(gold)
    if ranked.ndim != 2 or len(ranked) != len(gold):
        raise ValueError(f"ranked must be (num_queries, k) for {len(gold)} queries, got shape {ranked.shape}.")
    matches = (ranked == gold[:, None]) & (gold[:, None] >= 0)
    return np.where(matches.any(1), matches.argmax(1) + 1, 0)


def hits_at_k(ranked: np.ndarray, gold: Sequence[int], k: int) -> float:
    ranks = gold_ranks(ranked, gold)
    return float(((ranks > 0) & (ranks <= k)).mean()) if len(ranks) else 0.0


def mrr_at_k(ranked: np.ndarray, gold: Sequence[int], k: int) -> float:
    ranks = gold_ranks(ranked, gold)
    reciprocal = np.where((ranks > 0) & (ranks <= k), 1.0 / np.maximum(ranks, 1), 0.0)
    return float(reciprocal.mean()) if len(ranks) else 0.0


def ranking_metrics(ranked: np.ndarray, gold: Sequence[int], ks: Sequence[int] = (1, 5, 10),
                    mrr_k: int = 10) -> dict[str, float]:
    metrics = {f"hits@{k}": hits_at_k(ranked, gold, k) for k in ks}
    metrics[f"mrr@{mrr_k}"] = mrr_at_k(ranked, gold, mrr_k)
    return metrics


def caption_metrics(hypotheses: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """Caption quality on images whose captions never trained: corpus BLEU-4 (sacrebleu, 0-100) of one caption
    per image against all its real captions, and the share of images whose caption equals one of them exactly
    (case and spacing ignored). Tells a weak captioner from a weak index."""
    import sacrebleu

    keys = [key for key in hypotheses if references.get(key)]
    if not keys:
        return {}
    width = max(len(references[key]) for key in keys)
    # sacrebleu takes reference streams of equal length; repeating a reference leaves BLEU unchanged
    streams = [[references[key][min(i, len(references[key]) - 1)] for key in keys] for i in range(width)]
    bleu = sacrebleu.corpus_bleu([hypotheses[key] for key in keys], streams).score

    def normal(text):
        return " ".join(text.lower().split())

    exact = sum(normal(hypotheses[key]) in {normal(r) for r in references[key]} for key in keys) / len(keys)
    return {"caption_bleu": float(bleu), "caption_exact": float(exact), "caption_num_images": len(keys)}


def reported_ks(retrieval_k: int) -> tuple[int, ...]:
    """The Hits@k a search with `retrieval_k` results can support: 1, 5, 10 up to retrieval_k, and retrieval_k
    itself (a 1-beam search reports Hits@1 only, never a Hits@10 it could not have measured)."""
    return tuple(sorted({k for k in (1, 5, 10) if k <= retrieval_k} | {retrieval_k}))


def compute_ranking_metrics(ks: Sequence[int] = (1, 5, 10), mrr_k: int = 10):
    """For our trainer: predictions are (N, k) ranked positions, or (N, 2, k) with the re-ranked positions second
    (reported under `rerank_` keys), or a (positions, scores) pair of those; label_ids (N,) gold positions, or (N, 2) gold positions and query ids, in
    which case repeated query ids (distributed padding) count once."""

    def compute(eval_prediction) -> dict[str, float]:
        predictions = eval_prediction.predictions
        if isinstance(predictions, (tuple, list)):  # (positions, scores): only positions count
            predictions = predictions[0]
        ranked, labels = np.asarray(predictions), np.asarray(eval_prediction.label_ids)
        if labels.ndim == 2:
            _, first = np.unique(labels[:, 1], return_index=True)
            ranked, labels = ranked[first], labels[first, 0]
        reranked = None
        if ranked.ndim == 3:
            ranked, reranked = ranked[:, 0], ranked[:, 1]
        metrics = ranking_metrics(ranked, labels, ks, mrr_k)
        metrics["num_queries"] = len(labels)
        if reranked is not None:
            metrics.update({f"rerank_{name}": value for name, value in ranking_metrics(reranked, labels, ks,
                                                                                      mrr_k).items()})
        return metrics

    return compute


def compute_metrics_for_generation(index: ImageIndex, num_return_sequences: int, ks: Sequence[int] = (1, 5, 10),
                                   mrr_k: int = 10):
    """For a plain Seq2SeqTrainer with `predict_with_generate`: predictions are generated token rows shaped
    (N * k, L) or (N, k, L) (start token first), label_ids the (N, L) identifier labels (-100 padded)."""

    def compute(eval_prediction) -> dict[str, float]:
        labels = np.asarray(eval_prediction.label_ids)
        predictions = np.asarray(eval_prediction.predictions)
        num_queries = len(labels)
        rows = predictions.reshape(-1, predictions.shape[-1])
        if len(rows) != num_queries * num_return_sequences:
            raise ValueError(f"{len(rows)} generated rows for {num_queries} queries x {num_return_sequences} "
                             "returned sequences.")
        candidates = index.decode(rows).reshape(num_queries, num_return_sequences)
        gold = [index.position_of_label(row) for row in labels.tolist()]
        # duplicates are kept in place here: they occupy their slot and can never be a second hit
        return ranking_metrics(candidates, gold, ks, mrr_k)

    return compute


__all__ = ["caption_metrics", "reported_ks", "gold_ranks", "hits_at_k", "mrr_at_k", "ranking_metrics", "compute_ranking_metrics",
           "compute_metrics_for_generation"]
