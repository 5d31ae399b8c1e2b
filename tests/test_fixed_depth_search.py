"""The trie beam search (`trie_beam_search` in `ranking.py`) returns what `model.generate` + the trie's logits processor
returns: the same ids in the same order with the same scores, for every id scheme, ids of mixed lengths, ids that
extend other ids, collision tokens, batches, k below and above the number of images, image and text queries."""

import copy

import numpy as np
import pytest
import torch

from conftest import tiny_config
from vit_t5_dsi import ViTT5DSIForConditionalGeneration
from vit_t5_dsi.checkpoint.image_index import ImageIndex
from vit_t5_dsi.checkpoint.ranking import rank_by_generation, rank_queries
from vit_t5_dsi.identifiers.build import build_image_index

KEYS = [f"image_{i:03d}.png" for i in range(40)]


def assert_same_ranking(index, model, k, **queries):
    expected = rank_by_generation(model, index, k, search="generate", **queries)
    got = rank_by_generation(model, index, k, search="trie", **queries)
    np.testing.assert_array_equal(got.positions, expected.positions)
    np.testing.assert_allclose(got.scores, expected.scores, rtol=1e-5, atol=1e-5)
    return got


def clustered_embeddings(n=40, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(4, 8)) * 10
    return centres[np.arange(n) % 4] + rng.normal(size=(n, 8)) * 0.1


@pytest.mark.parametrize("scheme", ["naive", "atomic", "semantic", "rq"])
@pytest.mark.parametrize("variant", ["cross_attention", "codebook"])
def test_every_scheme_matches_generate(tokenizer, scheme, variant):
    tokenizer = copy.deepcopy(tokenizer)  # atomic ids add tokens
    kwargs = {"semantic": dict(embeddings=clustered_embeddings(), num_clusters=4, max_leaf_size=6),
              "rq": dict(embeddings=clustered_embeddings(), rq_num_levels=2, rq_codes_per_level=4)}.get(scheme, {})
    index = build_image_index(KEYS, tokenizer, scheme, **kwargs)
    model = ViTT5DSIForConditionalGeneration(tiny_config(variant, vocab_size=len(tokenizer))).eval()
    index.resize_model_embeddings(model)
    pixel_values = torch.randn(3, 3, 32, 32)
    text = tokenizer(["a red circle", "two blue squares at the top", "a star"], padding=True, return_tensors="pt")
    for k in (1, 3, 10):  # k < beams is impossible (beams = k), k = 1 runs 2 beams and keeps one
        ranking = assert_same_ranking(index, model, k, pixel_values=pixel_values)
        assert (ranking.positions >= 0).all()
        assert_same_ranking(index, model, k, input_ids=text.input_ids, attention_mask=text.attention_mask)


def mixed_length_ids(n, rng, levels=4, codes=3, base=10):
    """rq-like ids: one code token per level (a token range per level), 1..levels levels, so some ids extend
    others, and a position token after the codes where two images would share an id (a collision)."""
    taken, ids = set(), []
    while len(ids) < n:
        row = tuple(base + d * codes + int(rng.integers(codes)) for d in range(int(rng.integers(1, levels + 1))))
        if row in taken:
            row += (base + levels * codes + int(rng.integers(6)),)
            if row in taken:
                continue
        taken.add(row)
        ids.append(list(row))
    return ids


@pytest.mark.parametrize("seed", range(8))
def test_mixed_lengths_prefixes_and_collisions_match_generate(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 40))
    ids = mixed_length_ids(n, rng)
    assert any(len(a) < len(b) and b[:len(a)] == a for a in ids for b in ids), "no id extends another"
    index = ImageIndex([f"k{i}" for i in range(n)], [" ".join(map(str, row)) for row in ids], ids, "semantic",
                       eos_token_id=1, pad_token_id=0)
    torch.manual_seed(seed)
    model = ViTT5DSIForConditionalGeneration(tiny_config(vocab_size=64)).eval()
    queries = torch.randint(3, 64, (int(rng.integers(1, 5)), 7))
    queries[0, 5:] = 0  # a padded query
    for k in (1, 2, 5, n, 50):  # 50: more beams asked for than there are images
        ranking = assert_same_ranking(index, model, k, input_ids=queries)
        valid = ranking.positions[ranking.positions >= 0]
        assert len(valid) == len(ranking.positions) * min(k, n)


def test_one_image_and_a_model_sure_of_one_id():
    index = ImageIndex(["only"], ["5 6"], [[5, 6]], "semantic", eos_token_id=1, pad_token_id=0)
    model = ViTT5DSIForConditionalGeneration(tiny_config(vocab_size=16)).eval()
    with torch.no_grad():
        model.language_model.lm_head.weight[6] += 5.0  # very sure at one step: near-ties elsewhere vanish
    ranking = assert_same_ranking(index, model, 3, input_ids=torch.randint(3, 16, (2, 5)))
    assert ranking.positions.tolist() == [[0, -1, -1], [0, -1, -1]]


def test_the_retrieval_path_uses_the_trie_search_and_generate_stays_available(tokenizer, monkeypatch):
    index = build_image_index(KEYS[:10], tokenizer, "naive")
    model = ViTT5DSIForConditionalGeneration(tiny_config(vocab_size=len(tokenizer))).eval()
    text = tokenizer(["a red circle"], return_tensors="pt")
    expected = rank_queries(model, index, 4, text.input_ids, text.attention_mask, search="generate")

    def no_generate(*args, **kwargs):
        raise AssertionError("the retrieval path called generate")

    monkeypatch.setattr(model, "generate", no_generate)
    got = rank_queries(model, index, 4, text.input_ids, text.attention_mask)
    np.testing.assert_array_equal(got.positions, expected.positions)


def test_generate_options_need_the_generate_search(tokenizer):
    index = build_image_index(KEYS[:5], tokenizer, "naive")
    model = ViTT5DSIForConditionalGeneration(tiny_config(vocab_size=len(tokenizer))).eval()
    with pytest.raises(ValueError, match="search='generate'"):
        rank_by_generation(model, index, 2, pixel_values=torch.randn(1, 3, 32, 32), search="trie", logits_processor=[])
    with pytest.raises(ValueError, match="search="):
        rank_by_generation(model, index, 2, pixel_values=torch.randn(1, 3, 32, 32), search="fast")


def test_catalogue_shaped_rq_ids_match_generate():
    """4 levels of 16 codes with uneven frequencies and a fifth (position) token only where ids collide."""
    rng = np.random.default_rng(0)
    codes = np.stack([rng.choice(16, size=3000, p=rng.dirichlet(np.ones(16))) for _ in range(4)], 1)
    ids, seen = [], {}
    for row in (codes + 10 + 16 * np.arange(4)).tolist():
        count = seen.get(tuple(row), 0)
        seen[tuple(row)] = count + 1
        ids.append(row + [80 + count - 1] if count else row)
    assert {len(row) for row in ids} == {4, 5}
    index = ImageIndex([f"k{i}" for i in range(len(ids))], [" ".join(map(str, row)) for row in ids], ids,
                       "semantic", eos_token_id=1, pad_token_id=0)
    model = ViTT5DSIForConditionalGeneration(tiny_config(vocab_size=128)).eval()
    for k in (3, 10):
        assert_same_ranking(index, model, k, input_ids=torch.randint(3, 128, (5, 9)))


def test_a_token_table_wider_than_its_longest_id():
    """A table with a column no id reaches (a collision column where nothing collided) builds and searches."""
    table = np.array([[10, 20, -1], [10, 21, -1], [11, 20, -1]], dtype=np.int32)
    index = ImageIndex.from_token_table(["a", "b", "c"], table, scheme="semantic", eos_token_id=1, pad_token_id=0)
    assert index.trie.children([10]) == [20, 21]
    model = ViTT5DSIForConditionalGeneration(tiny_config(vocab_size=32)).eval()
    assert_same_ranking(index, model, 3, input_ids=torch.randint(3, 32, (2, 5)))


@pytest.mark.parametrize("feed_forward_proj, tie_word_embeddings", [("relu", True), ("gated-gelu", False)])
def test_the_hand_written_decoder_steps_give_the_t5_stacks_logits(feed_forward_proj, tie_word_embeddings):
    """T5DecoderSteps (what the trie search decodes with) equals T5ForConditionalGeneration step for step, with a
    padded encoder, rows that move between beams, both feed-forward kinds and tied or untied output embeddings."""
    from transformers import T5Config, T5ForConditionalGeneration
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache
    from transformers.modeling_outputs import BaseModelOutput

    from vit_t5_dsi.checkpoint.modeling_blocks import T5DecoderSteps

    torch.manual_seed(0)
    config = T5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_heads=4, decoder_start_token_id=0,
                      feed_forward_proj=feed_forward_proj, tie_word_embeddings=tie_word_embeddings)
    model = T5ForConditionalGeneration(config).eval()
    batch, beams, length = 2, 3, 7
    states = torch.randn(batch, length, 32)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 4:] = 0  # the second query is shorter
    steps = T5DecoderSteps(model, states, mask)
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    rows_states, rows_mask = states, mask
    tokens = torch.zeros(batch, dtype=torch.long)
    for step in range(4):
        with torch.no_grad():
            expected = model(encoder_outputs=BaseModelOutput(last_hidden_state=rows_states), attention_mask=rows_mask,
                             decoder_input_ids=tokens[:, None], cache=cache, use_cache=True).logits[:, -1]
        torch.testing.assert_close(steps.step(tokens), expected, rtol=1e-5, atol=1e-5)
        # every query keeps `beams` rows from its own rows, in a shuffled order (as beams do)
        width = tokens.shape[0] // batch
        source = torch.stack([q * width + torch.randint(0, width, (beams,)) for q in range(batch)]).reshape(-1)
        steps.reorder(source)
        cache.reorder_cache(source)
        rows_states, rows_mask = states.repeat_interleave(beams, 0), mask.repeat_interleave(beams, 0)
        tokens = torch.randint(1, 50, (batch * beams,))
