"""Rank the indexed images for a batch of queries: constrained beam search (`rank_by_generation`), dot products
(a dual encoder: `search_embeddings`), and dense re-ranking of a generative top-k (`DenseReranker`).

Dense search is the dual encoder's own search over the indexed images' embeddings, as a user would deploy it: faiss when
it is installed (a flat inner-product index: exact, what evaluation uses; past `APPROXIMATE_ABOVE` images the search
surfaces switch to an IVF index), else one matrix product in torch (exact). Embeddings are L2-normalised, so inner
product is cosine.

faiss is imported inside `try`: transformers' remote-code loader refuses a checkpoint whose code imports a missing
module outside one, and a checkpoint must load where faiss is not installed.

Dense re-ranking (GENIUS): a dual encoder re-scores the beam's candidates. Beam search is good at finding the right
region of the collection and weaker at ordering the few images inside it; a dual encoder orders a handful of candidates
cheaply (k dot products per query, no search over the whole collection). Both scores become log-probabilities over the k
candidates and are mixed with one weight:

    fused = (1 - weight) * log_softmax(generative log-prob) + weight * log_softmax(scale * cosine)

where `scale` is the dual encoder's own learned temperature. weight 0 keeps the beam's order, 1 orders the beam's
candidates by the dual encoder alone. Only the order changes: the candidates are the generative model's.

The trie beam search (`trie_beam_search`) is a beam search constrained to an `IdTrie`, written for short
fixed-depth ids: `generate`'s results, faster. `model.generate` with `TrieConstrainedLogitsProcessor` pays, per step, for a generic loop: a (beams x
vocabulary) -inf mask built and scattered, a hash of every beam's prefix to find its trie node again, a top-k over beams
x vocabulary, stopping criteria and output bookkeeping. Identifiers are a handful of tokens from a trie, so this search
keeps each beam's trie node beside it and scores only the (beam, allowed token) pairs: the children of the beam's node,
plus eos where an id ends. The decoder is `T5DecoderSteps` (`modeling_blocks.py`), T5's decoder written against its
weights; the first step runs one row per query instead of one per beam, and the beam bookkeeping runs in numpy.

It reproduces `generate`'s beam search as `rank_by_generation` configures it (num_beams = num_return_sequences,
length_penalty 0, early_stopping "never", one eos token), step for step:
  - scores are log-softmax over the whole vocabulary, accumulated in float32. The normaliser needs every logit, so
    the LM head stays full: restricting it to the allowed codes would change every score (and the order of beams
    across parents), which exactness rules out;
  - each step keeps the 2 x beams best candidates; an eos candidate among the first `beams` of them is a finished
    id, the best `beams` non-eos ones run on;
  - a query stops adding finished ids once all `beams` slots hold one and its best running beam cannot beat the
    worst of them.
What it leaves out is only `generate`'s filler: its beams start as one real beam plus copies scored -1e9, and a
step with fewer than 2 x beams allowed continuations takes -1e9/-inf candidates. These never outrank a real
hypothesis, so the real ids, their order and scores are the same; filler that `generate` returns (score <= -1e9,
when fewer than `beams` ids were found) is blanked by `rank_by_generation` on both paths.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import numpy as np
import torch
from transformers import LogitsProcessorList

from .image_index import ImageIndex
from .image_index_files import EMBEDDINGS_FILE_NAME
from .modeling_blocks import T5DecoderSteps

# Up to this many images every search is exact (a flat index: at 1M x 256 floats one query batch is ~1 GFLOP, a few
# ms); above it the pipeline, the retriever and the app search an IVF index (evaluation always stays exact).
APPROXIMATE_ABOVE = 1_000_000
# IVF: ~4 sqrt(N) lists, trained on at most 64 points per list (faiss' own guidance is 30-256), 32 lists probed
IVF_LISTS_PER_SQRT_N, IVF_TRAINING_POINTS_PER_LIST, IVF_NPROBE = 4, 64, 32

# built indexes by id of their embeddings tensor, dropped with the tensor (a tensor compares element-wise, so it
# cannot key a WeakKeyDictionary)
_built: dict[int, tuple] = {}


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def faiss_index_for(image_embeds: torch.Tensor, approximate: bool):
    """The faiss index over `image_embeds` (built once per tensor and kind), or None without faiss or off the
    CPU (a GPU matrix product is already what a flat GPU index does)."""
    faiss = _faiss()
    if faiss is None or image_embeds.device.type != "cpu":
        return None
    kind = "ivf" if approximate and len(image_embeds) > APPROXIMATE_ABOVE else "flat"
    cached = _built.get(id(image_embeds))
    if cached is not None and cached[:2] == (kind, image_embeds.data_ptr()):
        return cached[2]
    vectors = np.ascontiguousarray(image_embeds.detach().float().numpy())
    dim = vectors.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    else:
        lists = int(IVF_LISTS_PER_SQRT_N * math.sqrt(len(vectors)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(0).choice(len(vectors), min(len(vectors), lists * IVF_TRAINING_POINTS_PER_LIST),
                                                 replace=False)
        index.train(vectors[np.sort(sample)])
        index.nprobe = IVF_NPROBE
    index.add(vectors)
    if id(image_embeds) not in _built:
        weakref.finalize(image_embeds, _built.pop, id(image_embeds), None)
    _built[id(image_embeds)] = (kind, image_embeds.data_ptr(), index)
    return index


@torch.no_grad()
def search_embeddings(queries: torch.Tensor, image_embeds: torch.Tensor, k: int, approximate: bool = False
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, positions) per query by inner product; positions -1 where fewer than k images exist."""
    k = min(k, len(image_embeds))
    index = faiss_index_for(image_embeds, approximate)
    if index is not None:
        scores, positions = index.search(np.ascontiguousarray(queries.detach().float().cpu().numpy()), k)
        return scores.astype(np.float32), positions.astype(np.int64)
    similarity = queries.float() @ image_embeds.float().T
    scores, positions = similarity.topk(k, dim=1)
    return scores.cpu().numpy(), positions.cpu().numpy()


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


NEG_INF = float("-inf")


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of each row's k largest scores, best first (k <= row width)."""
    if scores.shape[1] > k:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    rows = np.arange(len(scores))[:, None]
    return part[rows, np.argsort(-scores[rows, part], axis=1, kind="stable")]


@torch.no_grad()
def trie_beam_search(language_model, trie, encoder_states: torch.Tensor, encoder_mask: torch.Tensor,
                     num_beams: int, max_new_tokens: int, decoder_start_token_id: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search over `trie` for each row of `encoder_states` (B, S, d) read by a T5 `language_model`.

    Returns the finished ids (B, num_beams, 1 + max_new_tokens): start token, id tokens, eos, then pad, best first,
    and their scores (B, num_beams): summed log-probabilities, -inf in a slot no id reached (its row is all pad).

    Only the decoder and the log-softmax's normaliser run in torch; the beam bookkeeping runs on a few hundred
    numbers per query, where numpy's per-call cost is a fraction of torch's.
    """
    batch, device = encoder_states.shape[0], encoder_states.device
    beams, eos, pad = num_beams, trie.eos_token_id, trie.pad_token_id
    length = 1 + max_new_tokens
    # step 0 runs one row per query (every beam starts from the same empty prefix); afterwards batch x beams rows
    decoder = T5DecoderSteps(language_model, encoder_states, encoder_mask, max_steps=max_new_tokens)
    queries = np.arange(batch)[:, None]
    running = np.full((batch, 1, length), pad, dtype=np.int64)
    running[:, :, 0] = decoder_start_token_id
    running_scores = np.zeros((batch, 1), dtype=np.float32)
    nodes = np.zeros(batch, dtype=np.int64)
    finished = np.full((batch, beams, length), pad, dtype=np.int64)
    finished_scores = np.full((batch, beams), NEG_INF, dtype=np.float32)
    stopped = np.zeros(batch, dtype=bool)
    keep = 2 * beams  # generate keeps (1 + number of eos tokens) x beams candidates per step
    first = np.arange(keep) < beams
    for step in range(max_new_tokens):
        width = running.shape[1]
        logits = decoder.step(torch.from_numpy(running[:, :, step].reshape(-1)).to(device)).float()
        tokens, valid, children = trie.candidate_table(nodes, logits.shape[-1])
        scores = torch.log_softmax(logits, -1).gather(1, torch.from_numpy(tokens).to(device)).cpu().numpy()
        scores[~valid] = NEG_INF
        slots = tokens.shape[1]
        scores = (scores.reshape(batch, width, slots) + running_scores[:, :, None]).reshape(batch, -1)
        if scores.shape[1] < keep:  # too few (beam, token) pairs: pad with impossible candidates
            scores = np.concatenate([scores, np.full((batch, keep - scores.shape[1]), NEG_INF, np.float32)], 1)
        top = _top(scores, keep)
        top_scores = scores[queries, top]
        top = np.minimum(top, width * slots - 1)
        parent = top // slots
        candidate = (queries * width + parent) * slots + top % slots  # flat (beam row, slot) of each candidate
        top_tokens = tokens.reshape(-1)[candidate]
        is_eos = (top_tokens == eos) & np.isfinite(top_scores)
        sequences = running[queries, parent]
        sequences[:, :, step + 1] = top_tokens
        # finished: eos among the first `beams` candidates, unless the query already stopped
        new_done = is_eos & first[None, :] & ~stopped[:, None]
        merged = np.concatenate([finished_scores, np.where(new_done, top_scores, NEG_INF)], 1)
        best = _top(merged, beams)
        finished_scores = merged[queries, best]
        finished = np.concatenate([finished, sequences], 1)[queries, best]
        # running: the best `beams` candidates that are not eos
        alive_scores = np.where(is_eos, NEG_INF, top_scores)
        pick = _top(alive_scores, beams)
        running_scores = alive_scores[queries, pick]
        running = sequences[queries, pick]
        picked = candidate[queries, pick].reshape(-1)
        nodes = np.where(np.isfinite(running_scores.reshape(-1)), children.reshape(-1)[picked], -1)
        full = np.isfinite(finished_scores).all(1)
        stopped |= ~(running_scores[:, 0] > np.where(full, finished_scores.min(1), NEG_INF))
        if stopped.all():
            break
        decoder.reorder(torch.from_numpy(picked // slots).to(device))  # each new beam's parent row
    finished[~np.isfinite(finished_scores)] = pad  # slots no id reached (ties among -inf keep no order)
    return torch.from_numpy(finished).to(device), torch.from_numpy(finished_scores).to(device)


@torch.no_grad()
def rank_by_generation(model, index: ImageIndex, k: int = 10, pixel_values=None, input_ids=None,
                       attention_mask=None, search: str = "auto", **generate_kwargs) -> Ranking:
    """Constrained beam search with num_beams = num_return_sequences = k (at most the number of images); only
    existing, distinct images come back. Scores are sequence log-probabilities: length_penalty 0 compares ids of
    different lengths fairly, and early_stopping="never" is canonical beam search, which stops only when no running
    beam can beat the k-th finished id (early_stopping=True stops at the first k finished ids, so a short id can
    shut out a better long one).

    `search`: "trie" runs `trie_beam_search`, which returns what generate returns (same ids,
    order and scores) with less overhead per step (1.5-3.6x faster, docs/index_at_scale.md); "generate" runs
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
    """Dual-encoder retrieval: top-k images by inner product over the indexed images (see `search_embeddings`:
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


__all__ = ["search_embeddings", "faiss_index_for", "APPROXIMATE_ABOVE", "Ranking", "distinct_topk",
           "rank_by_generation", "rank_by_similarity", "rank_queries", "SEARCHES", "DenseReranker"]
