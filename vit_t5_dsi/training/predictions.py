"""Per-query predictions of an evaluation, for error analysis (as `run_translation.py` writes
`generated_predictions.txt`): `OUTPUT_DIR/<set>_predictions.jsonl`, one JSON object per query.

    {"query_id": 3, "query": "a red circle ...", "gold": "scene_000006.png", "gold_rank": 2,
     "top_k": [{"image_key": "scene_000141.png", "score": -0.41}, ...],
     "reranked_gold_rank": 1, "reranked_top_k": [...]}

`query` is the caption (null for indexing queries, whose query is the gold image itself); `gold_rank` is 1-based,
null when the gold image is not among the `top_k`. The `reranked_*` fields appear when a dual encoder re-ranked
the beam. Every query appears once, in the order of its set, whatever the number of processes.
"""

from __future__ import annotations

import json
import math

import numpy as np

from ..checkpoint.checkpoint_io import atomic_write_text

PREDICTIONS_FILE = "{prefix}_predictions.jsonl"


def _hits(index, positions, scores) -> list[dict]:
    return [{"image_key": index.keys[int(p)], "score": float(s) if math.isfinite(s) else None}
            for p, s in zip(positions.tolist(), scores.tolist()) if p >= 0]


def _gold_rank(positions: np.ndarray, gold: int) -> int | None:
    found = np.flatnonzero(positions == gold)
    return int(found[0]) + 1 if len(found) else None


def prediction_records(dataset, predictions, label_ids, index) -> list[dict]:
    """The records of one evaluation. `predictions`: (positions, scores), each (N, k) or (N, 2, k) with the
    re-ranked ranking second; `label_ids`: (N, 2) gold positions and query ids (distributed padding repeats some
    queries: each is kept once)."""
    positions, scores = (np.asarray(a) for a in predictions)
    labels = np.asarray(label_ids)
    query_ids, first = np.unique(labels[:, 1], return_index=True)
    row_of_query = {int(q): row for row, q in enumerate(dataset["query_id"])}
    captions = dataset["caption"]
    records = []
    for query_id, i in sorted(zip(query_ids.tolist(), first.tolist()), key=lambda pair: row_of_query[pair[0]]):
        row = row_of_query[query_id]
        gold = int(labels[i, 0])
        ranked, ranked_scores = (positions[i], scores[i]) if positions.ndim == 2 else (positions[i, 0], scores[i, 0])
        record = {"query_id": query_id, "query": captions[row] if captions[row] else None,
                  "gold": index.keys[gold], "gold_rank": _gold_rank(ranked, gold),
                  "top_k": _hits(index, ranked, ranked_scores)}
        if positions.ndim == 3:
            record["reranked_gold_rank"] = _gold_rank(positions[i, 1], gold)
            record["reranked_top_k"] = _hits(index, positions[i, 1], scores[i, 1])
        records.append(record)
    return records


def write_predictions(path: str, dataset, predictions, label_ids, index) -> int:
    """Write the records atomically (a crash leaves the previous file, never half of one); returns their number."""
    records = prediction_records(dataset, predictions, label_ids, index)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return len(records)


__all__ = ["PREDICTIONS_FILE", "prediction_records", "write_predictions"]
