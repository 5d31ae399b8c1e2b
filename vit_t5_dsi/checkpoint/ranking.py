"""Rank the indexed images for a batch of queries: constrained beam search, or dot products (dual encoder)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import LogitsProcessorList

from .dense_search import search_embeddings
from .fixed_depth_search import trie_beam_search
from .image_index import ImageIndex

SEARCHES = ("auto", "trie", "generate")
# `generate` starts every query with one real beam and copies of it scored -1e9, and pads a step that has too few
# continuations with them: a returned score at or below this is filler, not a log-probability of an id
FILLER_SCORE = -1e9 / 2


@dataclass
class Ranking:
    """Per query, up to k distinct index positions (-1 pads a short list) and their scores (best first)."""

    positions: np.ndarray  # (num_queries, k) int64
    scores: np.ndarray  # (num_queries, k) float32

    def keys(self, index: ImageIndex) -> list[list[tuple[str, float]]]:
        return [[(index.keys[p], float(s)) for p, s in zip(row, row_scores) if p >= 0]
                for row, row_scores in zip(self.positions, self.scores)]


def distinct_topk(candidates: np.ndarray, scores: np.ndarray, k: int) -> Ranking:
    """First k slots of each query's candidates, with invalid (-1) and repeated positions blanked to -1 in place:
    nothing moves up to fill a hole, so metrics see exactly what the search produced."""
    positions = np.full((len(candidates), k), -1, dtype=np.int64)
    kept_scores = np.full((len(candidates), k), -np.inf, dtype=np.float32)
    for row, (cands, cand_scores) in enumerate(zip(candidates, scores)):
        seen = set()
        for slot, (position, score) in enumerate(zip(cands[:k].tolist(), cand_scores[:k].tolist())):
            if position >= 0 and position not in seen:
                seen.add(position)
                positions[row, slot], kept_scores[row, slot] = position, score
    return Ranking(positions, kept_scores)


@torch.no_grad()
def rank_by_generation(model, index: ImageIndex, k: int = 10, pixel_values=None, input_ids=None,
                       attention_mask=None, search: str = "auto", **generate_kwargs) -> Ranking:
    """Constrained beam search with num_beams = num_return_sequences = k (at most the number of images); only
    existing, distinct images come back. Scores are sequence log-probabilities: length_penalty 0 compares ids of
    different lengths fairly, and early_stopping="never" is canonical beam search, which stops only when no running
    beam can beat the k-th finished id (early_stopping=True stops at the first k finished ids, so a short id can
    shut out a better long one).

    `search`: "trie" runs `fixed_depth_search.trie_beam_search`, which returns what generate returns (same ids,
    order and scores) with less overhead per step (1.1-2.2x faster, docs/index_at_scale.md); "generate" runs
    `model.generate` with the trie's logits processor; "auto" (the default) is "trie" unless `generate_kwargs`
    (extra logits processors, generate options) are given, which only generate understands."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    if search not in SEARCHES:
        raise ValueError(f"search={search!r} is not one of {', '.join(SEARCHES)}.")
    if search == "trie" and generate_kwargs:
        raise ValueError(f"search='trie' takes no generate options ({', '.join(generate_kwargs)}); use "
                         "search='generate'.")
    batch = (pixel_values if pixel_values is not None else input_ids).shape[0]
    beams = max(2, min(k, len(index)))  # one beam would be greedy search, which reports no sequence scores
    if search == "generate" or generate_kwargs:
        sequences, scores = _generate(model, index, beams, pixel_values, input_ids, attention_mask, generate_kwargs)
    else:
        encoded, mask, _ = model.encode(pixel_values, input_ids, attention_mask)
        start = model.generation_config.decoder_start_token_id  # where generate starts, as generate reads it
        start = model.config.decoder_start_token_id if start is None else start
        sequences, scores = trie_beam_search(model.language_model, index.trie, encoded.last_hidden_state, mask,
                                             beams, index.max_id_length, start)
    candidates = index.decode(sequences.reshape(batch * beams, -1)).reshape(batch, -1)
    scores = scores.float().cpu().numpy().reshape(batch, -1)
    candidates[scores <= FILLER_SCORE] = -1
    return distinct_topk(candidates, scores, k)


def _generate(model, index: ImageIndex, beams: int, pixel_values, input_ids, attention_mask, generate_kwargs):
    """`model.generate` with the trie's logits processor: (B * beams, L) sequences and their scores."""
    kwargs = dict(num_beams=beams, num_return_sequences=beams, max_new_tokens=index.max_id_length, do_sample=False,
                  early_stopping="never", length_penalty=0.0, return_dict_in_generate=True, output_scores=True)
    # the constraint runs last, so no earlier processor can re-admit a token it masked
    processors = LogitsProcessorList(list(generate_kwargs.pop("logits_processor", None) or []))
    processors.append(index.logits_processor())
    kwargs.update(generate_kwargs)
    out = model.generate(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                         logits_processor=processors, **kwargs)
    return out.sequences, out.sequences_scores


def rank_by_similarity(text_embeds: torch.Tensor, image_embeds: torch.Tensor, k: int = 10,
                       approximate: bool = False) -> Ranking:
    """Dual-encoder retrieval: top-k images by inner product over the indexed images (see `dense_search.py`:
    faiss when installed; `approximate` lets a very large collection use an IVF index)."""
    scores, positions = search_embeddings(text_embeds, image_embeds, k, approximate)
    return distinct_topk(positions, scores, k)


@torch.no_grad()
def rank_queries(model, index: ImageIndex, k: int, input_ids=None, attention_mask=None, pixel_values=None,
                 image_embeddings: torch.Tensor | None = None, reranker=None, texts: list[str] | None = None,
                 approximate: bool = False, search: str = "auto") -> Ranking:
    """One batch of text (`input_ids`) or image (`pixel_values`) queries, ranked the way the model retrieves: dot
    products with `image_embeddings` (a dual encoder), else constrained beam search, whose top-k a `reranker`
    (a `DenseReranker`) re-orders for text queries (`texts`). `approximate`: search surfaces may use an
    approximate dense index for very large collections; evaluation never does. `search` picks the generative
    search (see `rank_by_generation`)."""
    if image_embeddings is not None:
        queries = (model.encode_images(pixel_values) if pixel_values is not None
                   else model.encode_texts(input_ids, attention_mask))
        return rank_by_similarity(queries, image_embeddings, k, approximate)
    ranking = rank_by_generation(model, index, k, pixel_values=pixel_values, input_ids=input_ids,
                                 attention_mask=attention_mask, search=search)
    if reranker is not None and pixel_values is None:
        ranking = reranker.rerank(ranking, texts, index)
    return ranking


__all__ = ["Ranking", "distinct_topk", "rank_by_generation", "rank_by_similarity", "rank_queries", "SEARCHES"]
