"""Dense re-ranking of a generative top-k (GENIUS): a dual encoder re-scores the beam's candidates.

Beam search is good at finding the right region of the collection and weaker at ordering the few images inside
it; a dual encoder orders a handful of candidates cheaply (k dot products per query, no search over the whole
collection). Both scores become log-probabilities over the k candidates and are mixed with one weight:

    fused = (1 - weight) * log_softmax(generative log-prob) + weight * log_softmax(scale * cosine)

where `scale` is the dual encoder's own learned temperature. weight 0 keeps the beam's order, 1 orders the beam's
candidates by the dual encoder alone. Only the order changes: the candidates are the generative model's.
"""

from __future__ import annotations

import numpy as np
import torch

from .image_index import ImageIndex
from .image_index_files import EMBEDDINGS_FILE_NAME
from .ranking import Ranking


class DenseReranker:
    """`load_dense_reranker(dual_encoder_checkpoint).rerank(ranking, texts, index)` (see `loading.py`)."""

    def __init__(self, model, processor, weight: float = 0.5):
        if not model.config.is_dual_encoder:
            raise ValueError(f"Re-ranking needs a dual_encoder checkpoint, got variant {model.config.variant!r}.")
        if model.image_index is None or model.image_index.embeddings is None:
            raise ValueError(f"The dual encoder has no image embeddings ({EMBEDDINGS_FILE_NAME}) to re-rank with.")
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"The re-ranking weight must be in [0, 1], got {weight}.")
        self.model, self.processor, self.weight = model.eval(), processor, float(weight)
        self._aligned: tuple[int, torch.Tensor] | None = None

    def to(self, device) -> "DenseReranker":
        self.model.to(device)
        self._aligned = None
        return self

    def embeddings_for(self, index: ImageIndex) -> torch.Tensor:
        """The dual encoder's image embeddings in `index`'s order; every image of `index` must have one."""
        if self._aligned is not None and self._aligned[0] == id(index):
            return self._aligned[1]
        try:
            aligned = self.model.image_index.embeddings_for(index.keys).float().to(self.model.device)
        except ValueError as err:
            raise ValueError(f"The re-ranking dual encoder has {err}: it was trained on another collection.") from err
        self._aligned = (id(index), aligned)
        return aligned

    @torch.no_grad()
    def rerank(self, ranking: Ranking, texts: list[str], index: ImageIndex) -> Ranking:
        """Re-order each query's candidates (empty slots, -1, stay last)."""
        if len(texts) != len(ranking.positions):
            raise ValueError(f"{len(texts)} query texts for {len(ranking.positions)} ranked queries.")
        batch = self.processor(text=list(texts)).to(self.model.device)
        queries = self.model.encode_texts(batch["input_ids"], batch["attention_mask"]).float()
        images = self.embeddings_for(index)
        positions = torch.as_tensor(ranking.positions, device=images.device)
        valid = positions >= 0
        candidates = images[positions.clamp(min=0)]  # (B, k, d)
        scale = self.model.logit_scale.clamp(max=4.6052).exp().float()
        dense = (scale * torch.einsum("bd,bkd->bk", queries, candidates)).masked_fill(~valid, float("-inf"))
        generative = torch.as_tensor(ranking.scores, device=images.device).float().masked_fill(~valid, float("-inf"))
        fused = ((1 - self.weight) * _log_softmax(generative) + self.weight * _log_softmax(dense))
        fused = fused.masked_fill(~valid, float("-inf"))
        order = fused.argsort(dim=1, descending=True, stable=True)
        new_positions = torch.gather(positions, 1, order).masked_fill(~torch.gather(valid, 1, order), -1)
        return Ranking(new_positions.cpu().numpy().astype(np.int64),
                       torch.gather(fused, 1, order).cpu().numpy().astype(np.float32))


    @torch.no_grad()
    def gold_ranks(self, texts: list[str], gold_positions: list[int], index: ImageIndex,
                   batch_size: int = 256) -> np.ndarray:
        """0-based rank of each text's gold image among all of `index`'s images under the dual encoder alone (a
        round trip: does this text find its own image?)."""
        images = self.embeddings_for(index)
        ranks = []
        for start in range(0, len(texts), batch_size):
            batch = self.processor(text=list(texts[start:start + batch_size])).to(self.model.device)
            queries = self.model.encode_texts(batch["input_ids"], batch["attention_mask"]).float()
            scores = queries @ images.T
            gold = torch.as_tensor(gold_positions[start:start + batch_size], device=scores.device)
            gold_scores = scores.gather(1, gold[:, None])
            ranks.append((scores > gold_scores).sum(1).cpu())
        return torch.cat(ranks).numpy() if ranks else np.zeros(0, dtype=np.int64)


def _log_softmax(scores: torch.Tensor) -> torch.Tensor:
    """log_softmax over the valid (finite) slots; a row without any stays -inf, never NaN."""
    finite = torch.isfinite(scores)
    safe = torch.where(finite, scores, torch.full_like(scores, -1e30))
    return torch.where(finite, torch.log_softmax(safe, dim=1), scores)


__all__ = ["DenseReranker"]
