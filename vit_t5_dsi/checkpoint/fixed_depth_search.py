"""Beam search constrained to an identifier trie, written for short fixed-depth ids: `generate`'s results, faster.

`model.generate` with `TrieConstrainedLogitsProcessor` pays, per step, for a generic loop: a (beams x vocabulary)
-inf mask built and scattered, a hash of every beam's prefix to find its trie node again, a top-k over
beams x vocabulary, stopping criteria and output bookkeeping. Identifiers are a handful of tokens from a trie, so
this search keeps each beam's trie node beside it and scores only the (beam, allowed token) pairs: the children
of the beam's node, plus eos where an id ends. The decoder runs with its KV cache (an `EncoderDecoderCache`, as
generate uses it); the first step runs one row per query instead of one per beam.

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

import numpy as np
import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from .id_trie import IdTrie

NEG_INF = float("-inf")


def _candidates(trie: IdTrie, nodes: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per beam, its allowed tokens (R, F), whether each slot holds one (R, F), and the node each leads to (-1 for
    eos). F is the widest node among these beams, + 1 for eos; tokens beyond the model's vocabulary never count."""
    safe = nodes.clip(min=0)
    starts = trie.edge_start[safe].astype(np.int64)
    counts = np.where(nodes >= 0, trie.edge_start[safe + 1] - starts, 0)
    width = int(counts.max()) if len(counts) else 0
    slot = np.arange(width)
    edge = np.minimum(starts[:, None] + slot, max(len(trie.edge_token) - 1, 0))
    tokens = trie.edge_token[edge].astype(np.int64) if len(trie.edge_token) else np.zeros_like(edge)
    valid = slot < counts[:, None]
    children = edge + 1
    ends = trie.ends_at(nodes)
    tokens = np.concatenate([tokens, np.full((len(nodes), 1), trie.eos_token_id)], axis=1)
    valid = np.concatenate([valid, ends[:, None]], axis=1) & (tokens < vocab_size)
    children = np.concatenate([children, np.full((len(nodes), 1), -1)], axis=1)
    return np.where(valid, tokens, 0), valid, children


@torch.no_grad()
def trie_beam_search(language_model, trie: IdTrie, encoder_states: torch.Tensor, encoder_mask: torch.Tensor,
                     num_beams: int, max_new_tokens: int, decoder_start_token_id: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search over `trie` for each row of `encoder_states` (B, S, d) read by a T5 `language_model`.

    Returns the finished ids (B, num_beams, 1 + max_new_tokens): start token, id tokens, eos, then pad, best first,
    and their scores (B, num_beams): summed log-probabilities, -inf in a slot no id reached (its row is all pad).
    """
    batch, device = encoder_states.shape[0], encoder_states.device
    beams, eos, pad = num_beams, trie.eos_token_id, trie.pad_token_id
    length = 1 + max_new_tokens
    # no config: layers are created as the decoder fills them, which skips a deep copy of the config per search
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    # step 0 runs one row per query (every beam starts from the same empty prefix); afterwards batch x beams rows
    states, mask = encoder_states, encoder_mask
    running = torch.full((batch, 1, length), pad, dtype=torch.long, device=device)
    running[:, :, 0] = decoder_start_token_id
    running_scores = torch.zeros(batch, 1, device=device)
    nodes = np.zeros(batch, dtype=np.int64)
    finished = torch.full((batch, beams, length), pad, dtype=torch.long, device=device)
    finished_scores = torch.full((batch, beams), NEG_INF, device=device)
    stopped = torch.zeros(batch, dtype=torch.bool, device=device)
    keep = 2 * beams  # generate keeps (1 + number of eos tokens) x beams candidates per step
    for step in range(max_new_tokens):
        width = running.shape[1]
        logits = language_model(encoder_outputs=BaseModelOutput(last_hidden_state=states), attention_mask=mask,
                                decoder_input_ids=running[:, :, step].reshape(-1, 1), cache=cache,
                                use_cache=True).logits[:, -1, :].float()
        log_probs = torch.log_softmax(logits, dim=-1)
        tokens, valid, children = _candidates(trie, nodes, log_probs.shape[-1])
        tokens_t = torch.from_numpy(tokens).to(device)
        scores = log_probs.gather(1, tokens_t).masked_fill_(~torch.from_numpy(valid).to(device), NEG_INF)
        slots = tokens.shape[1]
        scores = (scores.view(batch, width, slots) + running_scores[:, :, None]).view(batch, -1)
        if scores.shape[1] < keep:  # too few (beam, token) pairs: pad with impossible candidates
            scores = torch.cat([scores, scores.new_full((batch, keep - scores.shape[1]), NEG_INF)], 1)
        top_scores, top = scores.topk(keep, dim=1)
        top = top.clamp(max=width * slots - 1)
        parent, slot = top // slots, top % slots
        rows = (torch.arange(batch, device=device)[:, None] * width + parent)  # flat row of each candidate's beam
        top_tokens = tokens_t.view(-1)[rows * slots + slot]
        is_eos = (top_tokens == eos) & torch.isfinite(top_scores)
        sequences = running.gather(1, parent[:, :, None].expand(-1, -1, length)).clone()
        sequences[:, :, step + 1] = top_tokens
        # finished: eos among the first `beams` candidates, unless the query already stopped
        new_done = is_eos & (torch.arange(keep, device=device) < beams)[None, :] & ~stopped[:, None]
        merged = torch.cat([finished_scores, top_scores.masked_fill(~new_done, NEG_INF)], 1)
        finished_scores, best = merged.topk(beams, dim=1)
        finished = torch.cat([finished, sequences], 1).gather(1, best[:, :, None].expand(-1, -1, length))
        # running: the best `beams` candidates that are not eos
        alive_scores = top_scores.masked_fill(is_eos, NEG_INF)
        running_scores, pick = alive_scores.topk(beams, dim=1)
        running = sequences.gather(1, pick[:, :, None].expand(-1, -1, length))
        source = rows.gather(1, pick).reshape(-1)  # each new beam's parent row
        nodes = children.reshape(-1)[(rows * slots + slot).gather(1, pick).reshape(-1).cpu().numpy()]
        nodes = np.where(np.isfinite(running_scores.reshape(-1).cpu().numpy()), nodes, -1)
        full = torch.isfinite(finished_scores).all(1)
        stopped |= ~(running_scores[:, 0] > torch.where(full, finished_scores.min(1).values, NEG_INF))
        if bool(stopped.all()):
            break
        if step == 0:  # from one row per query to one per beam: the cross-attention cache is copied per beam
            cache.reorder_cache(source)
            states = encoder_states.repeat_interleave(beams, dim=0)
            mask = encoder_mask.repeat_interleave(beams, dim=0)
        else:  # beams only move within their query, whose cross-attention rows are all the same
            cache.self_attention_cache.reorder_cache(source)
    return finished, finished_scores


__all__ = ["trie_beam_search"]
