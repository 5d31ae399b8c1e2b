import json

import numpy as np
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from conftest import tiny_config
from vit_t5_dsi.identifiers.build import build_image_index, initialise_code_embeddings
from vit_t5_dsi import ViTT5DSIForConditionalGeneration
from vit_t5_dsi.checkpoint.id_trie import IdTrie
from vit_t5_dsi.checkpoint.image_index import ImageIndex
from vit_t5_dsi.training.metrics import (compute_metrics_for_generation, gold_ranks, hits_at_k, mrr_at_k,
                                ranking_metrics)
from vit_t5_dsi.checkpoint.ranking import rank_by_generation, rank_by_similarity
from vit_t5_dsi.identifiers.semantic_ids import hierarchical_kmeans_ids

KEYS = [f"image_{i:03d}.png" for i in range(40)]


class AddBias(LogitsProcessor):
    """Pushes chosen tokens up at every step, or a target sequence step by step (a 'biased model')."""

    def __init__(self, tokens=None, sequence=None, amount=50.0):
        self.tokens, self.sequence, self.amount = tokens, sequence, amount

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        if self.tokens is not None:
            scores[:, self.tokens] += self.amount
        if self.sequence is not None:
            step = input_ids.shape[1] - 1
            if step < len(self.sequence):
                scores[:, self.sequence[step]] += self.amount
        return scores


def semantic_embeddings(n=40, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(4, 8)) * 10
    return centres[np.arange(n) % 4] + rng.normal(size=(n, 8)) * 0.1


def build(tokenizer, scheme):
    kwargs = {"semantic": dict(embeddings=semantic_embeddings(), num_clusters=4, max_leaf_size=6),
              "rq": dict(embeddings=semantic_embeddings(), rq_num_levels=2, rq_codes_per_level=4)}.get(scheme, {})
    return build_image_index(KEYS, tokenizer, scheme, **kwargs)


@pytest.fixture
def fresh_tokenizer(tokenizer):
    import copy

    return copy.deepcopy(tokenizer)  # atomic ids add tokens: keep the session tokenizer clean


# ----- the trie --------------------------------------------------------------------------------------

def test_trie_handles_ids_that_are_prefixes_of_others():
    trie = IdTrie([[5], [5, 6], [7, 8, 9]], eos_token_id=1, pad_token_id=0)
    assert sorted(trie.children([])) == [5, 7]
    assert sorted(trie.children([5])) == [1, 6]
    assert trie.children([5, 6]) == [1]
    assert sorted(trie.children([5, 6, 1])) == [0, 1]  # finished: pad/eos only, never an empty list
    assert sorted(trie.children([3])) == [0, 1]  # off the trie: pad/eos only


def test_every_child_table_tier_agrees_with_a_plain_dict_trie():
    """Fan-outs of 1-2, 5-12 and 40 in one trie: step and mask match a dict trie."""
    rng = np.random.default_rng(0)
    sequences = set()
    for first in range(40):  # the root: 40 children, wide
        for second in range(int(rng.choice([1, 2, 7, 12]))):
            for third in range(int(rng.choice([1, 1, 2]))):
                sequences.add((first + 3, second + 3, third + 3))
    sequences = sorted(sequences)
    trie = IdTrie(sequences, eos_token_id=1, pad_token_id=0)
    assert trie.max_fanout == 40
    children = {}
    for seq in sequences:
        for depth in range(len(seq) + 1):
            children.setdefault(seq[:depth], set()).add(seq[depth] if depth < len(seq) else 1)
    prefixes = list(children) + [(3, 99), (99,), (3, 3, 3, 1)]  # and off-trie / finished prefixes
    for prefix in prefixes:
        expected = children.get(prefix, {0, 1})
        node = trie.walk(np.asarray([list(prefix) or [0]])[:, : len(prefix)])
        allowed = torch.isfinite(trie.mask_scores(node, torch.zeros(1, 60)))[0].nonzero().flatten().tolist()
        assert set(allowed) == expected, prefix
    nodes = trie.walk(np.asarray([[s[0], s[1]] for s in sequences]))  # a batch mixing every fan-out
    steps = trie.step(nodes, np.asarray([s[2] for s in sequences]))
    assert (steps > 1).all() and len(set(steps.tolist())) == len(sequences)
    masked = torch.isfinite(trie.mask_scores(nodes, torch.zeros(len(nodes), 60)))
    for row, seq in enumerate(sequences):
        assert set(masked[row].nonzero().flatten().tolist()) == children[seq[:2]]


def test_the_packed_trie_agrees_with_a_dict_trie_on_random_ids_of_mixed_lengths():
    """Ids of 1-5 tokens, prefixes of one another, duplicates, wide and narrow nodes; built from lists and from a
    padded table: every prefix allows exactly the dict trie's tokens, and a step follows exactly its edges."""
    rng = np.random.default_rng(1)
    sequences = [tuple(int(t) for t in rng.integers(2, 2 + rng.choice([3, 40, 300]), size=rng.integers(1, 6)))
                 for _ in range(400)]
    sequences += sequences[:20]  # duplicates are one id
    children = {}
    for seq in sequences:
        for depth in range(len(seq) + 1):
            children.setdefault(seq[:depth], set()).add(seq[depth] if depth < len(seq) else 1)
    from_lists = IdTrie(sequences, eos_token_id=1, pad_token_id=0)
    table = np.full((len(sequences), 5), -1, dtype=np.int32)
    for row, seq in enumerate(sequences):
        table[row, :len(seq)] = seq
    from_table = IdTrie.from_table(table, None, eos_token_id=1, pad_token_id=0)
    assert from_table.num_nodes == from_lists.num_nodes == len(children)  # one node per distinct prefix
    for trie in (from_lists, from_table):
        prefixes = sorted(children, key=len)
        width = max(map(len, prefixes))
        for length in range(width + 1):
            batch = [p for p in prefixes if len(p) == length] + [(999,) * length] if length else [()]
            nodes = trie.walk(np.asarray([list(p) for p in batch], dtype=np.int64).reshape(len(batch), length))
            rows, tokens = trie.allowed_tokens(nodes)
            for row, prefix in enumerate(batch):
                assert set(tokens[rows == row].tolist()) == children.get(prefix, {0, 1}), prefix
    assert from_lists.nbytes < 12 * from_lists.num_nodes


# ----- constrained generation ------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["naive", "atomic", "semantic", "rq"])
def test_only_valid_distinct_ids_even_when_model_prefers_invalid_tokens(fresh_tokenizer, scheme):
    index = build(fresh_tokenizer, scheme)
    model = ViTT5DSIForConditionalGeneration(tiny_config(vocab_size=len(fresh_tokenizer))).eval()
    index.resize_model_embeddings(model)
    used = {t for ids in index.token_ids for t in ids}
    invalid = [t for t in range(3, model.get_input_embeddings().num_embeddings) if t not in used][:5]
    k = 8
    out = model.generate(pixel_values=torch.randn(3, 3, 32, 32), num_beams=k, num_return_sequences=k,
                         max_new_tokens=index.max_id_length,
                         logits_processor=LogitsProcessorList([AddBias(tokens=invalid), index.logits_processor()]))
    positions = index.decode(out).reshape(3, k)
    assert (positions >= 0).all(), "an invalid identifier came out"
    for row in positions:
        assert len(set(row.tolist())) == k, "the same image came out twice for one query"


@pytest.mark.parametrize("scheme", ["naive", "atomic", "semantic", "rq"])
def test_a_model_biased_toward_an_id_ranks_it_first(fresh_tokenizer, scheme):
    index = build(fresh_tokenizer, scheme)
    model = ViTT5DSIForConditionalGeneration(tiny_config(vocab_size=len(fresh_tokenizer))).eval()
    index.resize_model_embeddings(model)
    target = KEYS[17]
    ranking = rank_by_generation(model, index, k=5, pixel_values=torch.randn(2, 3, 32, 32),
                                 logits_processor=[AddBias(sequence=index.labels_for(target), amount=30.0)])
    assert [hits[0][0] for hits in ranking.keys(index)] == [target, target]
    assert (np.diff(ranking.scores, axis=1) <= 1e-6).all(), "scores are not best-first"


def test_prefix_allowed_tokens_fn_matches_processor(tokenizer):
    index = build(tokenizer, "naive")
    model = ViTT5DSIForConditionalGeneration(tiny_config(vocab_size=len(tokenizer))).eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    kwargs = dict(num_beams=4, num_return_sequences=4, max_new_tokens=index.max_id_length)
    a = model.generate(pixel_values=pixel_values, prefix_allowed_tokens_fn=index.prefix_allowed_tokens_fn(),
                       **kwargs)
    b = model.generate(pixel_values=pixel_values, logits_processor=LogitsProcessorList([index.logits_processor()]),
                       **kwargs)
    assert (index.decode(a) >= 0).all()
    np.testing.assert_array_equal(index.decode(a), index.decode(b))


def test_more_beams_than_images_yields_only_distinct_valid_ids(tokenizer):
    index = build_image_index(KEYS[:3], tokenizer, "naive")
    model = ViTT5DSIForConditionalGeneration(tiny_config(vocab_size=len(tokenizer))).eval()
    ranking = rank_by_generation(model, index, k=6, pixel_values=torch.randn(2, 3, 32, 32))
    for row in ranking.positions:
        valid = row[row >= 0].tolist()
        assert len(valid) == len(set(valid)) == 3


def test_rank_by_similarity():
    texts = torch.eye(3)
    images = torch.tensor([[0.0, 1, 0], [1, 0, 0], [0, 0, 1], [0.5, 0.5, 0]])
    ranking = rank_by_similarity(texts, images, k=2)
    assert ranking.positions[:, 0].tolist() == [1, 0, 2]


# ----- schemes ---------------------------------------------------------------------------------------

def test_semantic_ids_unique_deterministic_and_clustered():
    embeddings = semantic_embeddings()
    ids = hierarchical_kmeans_ids(embeddings, num_clusters=4, max_leaf_size=6, seed=3)
    assert len(set(ids)) == len(ids)
    assert ids == hierarchical_kmeans_ids(embeddings, num_clusters=4, max_leaf_size=6, seed=3)
    first_field = [i.split()[0] for i in ids]
    for group in range(4):  # rows i, i+4, ... come from one centre: one shared top-level prefix
        assert len({first_field[i] for i in range(group, 40, 4)}) == 1
    assert len(set(first_field)) == 4


def test_semantic_ids_terminate_on_identical_embeddings():
    ids = hierarchical_kmeans_ids(np.zeros((50, 4)), num_clusters=3, max_leaf_size=4)
    assert len(set(ids)) == 50


def test_semantic_scheme_needs_embeddings(tokenizer):
    with pytest.raises(ValueError, match="embeddings"):
        build_image_index(KEYS, tokenizer, "semantic")
    with pytest.raises(ValueError, match="scheme='random'"):
        build_image_index(KEYS, tokenizer, "random")


def test_atomic_scheme_adds_tokens_and_resizes_embeddings(fresh_tokenizer):
    before = len(fresh_tokenizer)
    index = build(fresh_tokenizer, "atomic")
    assert len(fresh_tokenizer) == before + len(KEYS)
    assert all(len(t) == 1 for t in index.token_ids)
    model = ViTT5DSIForConditionalGeneration(tiny_config(vocab_size=before))
    index.resize_model_embeddings(model)
    assert model.get_input_embeddings().num_embeddings >= before + len(KEYS)
    assert model.language_model.lm_head.weight.shape[0] == model.get_input_embeddings().num_embeddings


def test_duplicate_keys_rejected(tokenizer):
    with pytest.raises(ValueError, match="Duplicate image key 'a'"):
        build_image_index(["a", "b", "a"], tokenizer, "naive")


def test_decode_accepts_only_whole_ids_followed_by_padding(tokenizer):
    index = build(tokenizer, "semantic")
    eos, pad = index.eos_token_id, index.pad_token_id
    ids = [index.token_ids[p] for p in (3, 17, 39)]
    width = index.max_id_length + 2
    rows = [[pad] + t + [eos] + [pad] * (width - len(t) - 1) for t in ids]
    rows += [[pad] + ids[0] + [pad] * (width - len(ids[0])),  # no eos
             [pad] + ids[1][:-1] + [eos] + [pad] * (width - len(ids[1])),  # a prefix of an id
             [pad] + ids[2] + [eos, 5] + [pad] * (width - len(ids[2]) - 2),  # something after eos
             [pad] + ids[0] + [ids[0][-1], eos] + [pad] * (width - len(ids[0]) - 2)]  # one token too many
    assert index.decode(np.asarray(rows)).tolist() == [3, 17, 39, -1, -1, -1, -1]
    assert index.position_of_label(ids[1] + [eos, -100, -100]) == 17 and index.position_of_label([]) == -1
    short = ImageIndex(["a", "ab"], ["a", "ab"], [[10], [10, 20]], "naive", eos, pad)  # column 1 starts at 20
    assert short.position_of_label([10, 19, eos]) == -1 and short.position_of_label([10, 20, eos]) == 1
    assert index.positions_of([KEYS[5], "nope", KEYS[0]]).tolist() == [5, -1, 0]
    assert KEYS[5] in index.keys and "nope" not in index.position_of_key and index.keys[-1] == KEYS[-1]
    with pytest.raises(KeyError):
        index.position_of_key["nope"]


@pytest.mark.parametrize("wide", [False, True])
def test_token_table_lookup_matches_a_dict_with_and_without_packed_keys(wide):
    """`TokenTable.find` (decode's lookup): a sampled directory of packed keys when the ids fit in 63 bits, a binary
    search otherwise; both must find every id, in blocks of every size, and nothing else (prefixes, extensions,
    tokens a column never holds, tokens below a column's base)."""
    from vit_t5_dsi.checkpoint.index_arrays import TokenTable

    rng = np.random.default_rng(0)
    span = 60000 if wide else 50  # 5 columns x 16 bits do not pack into 63; x 6 bits do
    rows = {tuple(int(t) for t in rng.integers(100, 100 + span, size=rng.integers(3, 6))) for _ in range(3000)}
    rows = sorted(rows, key=lambda r: rng.random())
    width = max(map(len, rows))
    table = np.full((len(rows), width), -1)
    for i, row in enumerate(rows):
        table[i, :len(row)] = row
    tokens = TokenTable.from_table(table, np.array([len(r) for r in rows]))
    assert (tokens._sampled_keys() is None) == wide
    queries = rows[::7] + [r[:-1] for r in rows[:50]] + [r + (100,) for r in rows[:50] if len(r) < width]
    queries += [(99,) + r[1:] for r in rows[:20]] + [(100 + span,) + r[1:] for r in rows[:20]]
    queries += [(65535 + 100,) * 3, (7,)]
    positions = {row: i for i, row in enumerate(rows)}
    padded = np.zeros((len(queries), width + 1), dtype=np.int64)
    for i, query in enumerate(queries):
        padded[i, :len(query)] = query
    found = tokens.find(padded, np.array([len(q) for q in queries]))
    assert found.tolist() == [positions.get(q, -1) for q in queries]


# ----- persistence -----------------------------------------------------------------------------------

def index_files(directory):
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("columns", [False, True])
@pytest.mark.parametrize("scheme", ["naive", "atomic", "semantic", "rq"])
def test_index_save_load_round_trip_is_atomic(tmp_path, fresh_tokenizer, scheme, columns):
    index = build(fresh_tokenizer, scheme)
    index.record_image_paths([f"/data/{key}" if i % 3 else None for i, key in enumerate(KEYS)])
    index.save(tmp_path, columns=columns)
    # rq ids keep their frozen codebooks beside the index (images added later use them); the rest is the index
    assert ("rq_codebooks.safetensors" in index_files(tmp_path)) == (scheme == "rq")

    def own_files():
        return [name for name in index_files(tmp_path) if name != "rq_codebooks.safetensors"]

    files = own_files()  # no temp file left behind
    header = json.loads((tmp_path / "image_index.json").read_text())
    if columns:  # a small header naming the columns file; nothing per image in it
        assert files[1] == "image_index.json" and files[0].startswith("image_index-") and len(files) == 2
        assert header["arrays_file"] == files[0] and not {"keys", "id_strings", "token_ids", "image_files"} & set(
            header)
    else:  # the first layout: every list in one JSON file
        assert files == ["image_index.json"] and header == index.to_dict()
    loaded = ImageIndex.load(tmp_path)
    assert (loaded.keys, loaded.id_strings, loaded.token_ids) == (index.keys, index.id_strings, index.token_ids)
    assert loaded.to_dict() == index.to_dict() and loaded.max_token_id == index.max_token_id
    assert loaded.image_files[0] is None and loaded.image_files[1] == KEYS[1]
    loaded.check_tokenizer(fresh_tokenizer)
    index.save(tmp_path, columns=columns)  # saving the same index again writes the same files
    assert own_files() == files and json.loads((tmp_path / "image_index.json").read_text()) == header
    index.save(tmp_path, columns=not columns)  # the other layout replaces this one, stale columns included
    assert len(own_files()) == (1 if columns else 2)
    assert ImageIndex.load(tmp_path).to_dict() == index.to_dict()


@pytest.mark.parametrize("scheme", ["naive", "atomic", "semantic", "rq"])
def test_the_first_layout_still_loads(tmp_path, fresh_tokenizer, scheme):
    """Checkpoints written before the columns file: every list in image_index.json (what `to_dict` writes)."""
    index = build(fresh_tokenizer, scheme)
    index.record_image_paths([f"/data/{key}" if i % 3 else None for i, key in enumerate(KEYS)])
    layout = {"scheme": scheme, "eos_token_id": index.eos_token_id, "pad_token_id": index.pad_token_id,
              "added_tokens": index.added_tokens, "scheme_info": index.scheme_info, "keys": list(KEYS),
              "id_strings": [index.id_strings[i] for i in range(len(KEYS))],
              "token_ids": [index.token_ids[i] for i in range(len(KEYS))], "image_root": "/data",
              "image_files": [f"{key}" if i % 3 else None for i, key in enumerate(KEYS)]}
    (tmp_path / "image_index.json").write_text(json.dumps(layout))
    loaded = ImageIndex.load(tmp_path)
    assert (loaded.keys, loaded.id_strings, loaded.token_ids) == (index.keys, index.id_strings, index.token_ids)
    assert loaded.image_root == "/data" and list(loaded.image_files) == layout["image_files"]
    assert loaded.to_dict() == layout
    assert loaded.position_of_key[KEYS[7]] == 7 and loaded.labels_for(KEYS[7]) == layout["token_ids"][7] + [
        index.eos_token_id]
    loaded.save(tmp_path / "again", columns=True)  # and is written in today's layout
    assert ImageIndex.load(tmp_path / "again").to_dict() == layout


def test_a_large_index_is_saved_as_columns(tmp_path, fresh_tokenizer, monkeypatch):
    import vit_t5_dsi.checkpoint.image_index_files as image_index

    monkeypatch.setattr(image_index, "JSON_LIMIT", 10)
    index = build(fresh_tokenizer, "rq")
    index.save(tmp_path)
    header = json.loads((tmp_path / "image_index.json").read_text())
    assert "pieces" in header["id_string_rule"]  # rq id strings are their code tokens: nothing stored per image
    loaded = ImageIndex.load(tmp_path)
    assert loaded.to_dict() == index.to_dict()
    assert loaded.nbytes < 40 * 40


def test_a_header_and_columns_from_different_saves_are_an_error(tmp_path, tokenizer):
    build(tokenizer, "naive").save(tmp_path / "a", columns=True)
    build_image_index(KEYS[:5], tokenizer, "naive").save(tmp_path / "b", columns=True)
    old_columns = next(p for p in (tmp_path / "a").iterdir() if p.suffix == ".safetensors")
    new_columns = next(p for p in (tmp_path / "b").iterdir() if p.suffix == ".safetensors")
    old_columns.rename(tmp_path / "a" / new_columns.name)
    (tmp_path / "a" / "image_index.json").write_text((tmp_path / "b" / "image_index.json").read_text())
    with pytest.raises(ValueError, match="come from different saves"):
        ImageIndex.load(tmp_path / "a")
    (tmp_path / "a" / new_columns.name).unlink()
    with pytest.raises(ValueError, match="unreadable image index columns"):
        ImageIndex.load(tmp_path / "a")
    build_image_index(KEYS[:5], tokenizer, "naive").save(tmp_path / "a", columns=True)
    assert index_files(tmp_path / "a") == index_files(tmp_path / "b")
    from vit_t5_dsi.checkpoint.image_index_files import index_file_names

    (tmp_path / "a" / "config.json").write_text("{}")
    assert index_file_names(tmp_path / "a") == index_files(tmp_path / "b")


def test_failed_save_keeps_the_previous_index(tmp_path, tokenizer, monkeypatch):
    index = build(tokenizer, "naive")
    index.save(tmp_path)
    original, files = (tmp_path / "image_index.json").read_text(), index_files(tmp_path)
    import vit_t5_dsi.checkpoint.checkpoint_io

    monkeypatch.setattr(vit_t5_dsi.checkpoint.checkpoint_io.os, "fsync", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    for columns in (False, True):
        with pytest.raises(OSError):
            build_image_index(KEYS[:7], tokenizer, "naive").save(tmp_path, columns=columns)
    assert (tmp_path / "image_index.json").read_text() == original
    assert index_files(tmp_path) == files
    monkeypatch.undo()
    assert ImageIndex.load(tmp_path).keys == KEYS


def test_index_with_tokens_the_tokenizer_lacks_fails_clearly(tmp_path, fresh_tokenizer, tokenizer):
    index = build(fresh_tokenizer, "atomic")
    with pytest.raises(ValueError, match="lacks 40 identifier tokens"):
        index.check_tokenizer(tokenizer)
    model = ViTT5DSIForConditionalGeneration(tiny_config(vocab_size=len(tokenizer)))
    model.image_index = index
    model.save_pretrained(tmp_path)  # weights were never resized: index and weights disagree
    with pytest.raises(ValueError, match="do not belong together"):
        ViTT5DSIForConditionalGeneration.from_pretrained(tmp_path)


def test_image_paths_round_trip_and_follow_a_moved_collection(tmp_path, tokenizer):
    index = build(tokenizer, "naive")
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    paths = [tmp_path / "imgs" / ("sub" if i % 2 else "") / f"{key}.png" for i, key in enumerate(index.keys)]
    for path in paths[:-1]:
        path.write_bytes(b"png")
    index.record_image_paths([str(p) for p in paths[:-2]] + [None, str(paths[-1])])
    index.save(tmp_path / "ckpt")
    loaded = ImageIndex.load(tmp_path / "ckpt")
    assert loaded.image_root == str(tmp_path / "imgs") and loaded.image_files[1] == f"sub/{index.keys[1]}.png"
    assert loaded.image_path(0) == str(paths[0]) and loaded.image_path(1) == str(paths[1])
    assert loaded.image_path(len(index) - 2) is None  # recorded as unknown
    assert loaded.image_path(len(index) - 1) is None  # recorded, but the file is not here
    moved = tmp_path / "moved"
    (tmp_path / "imgs").rename(moved)
    assert loaded.image_path(0) is None and loaded.image_path(1, moved) == str(moved / "sub" / f"{index.keys[1]}.png")
    index.record_image_paths([None] * len(index))  # images held as bytes: nothing recorded
    assert index.image_files is None and "image_files" not in index.to_dict()
    with pytest.raises(ValueError, match="image paths for the"):
        index.record_image_paths(["a.png"])


def test_an_index_with_broken_image_files_is_named(tmp_path, tokenizer):
    data = build(tokenizer, "naive").to_dict()
    (tmp_path / "image_index.json").write_text(json.dumps({**data, "image_files": ["a.png"], "image_root": "/x"}))
    with pytest.raises(ValueError, match="image_index.json: image_files must list one path per image"):
        ImageIndex.load(tmp_path)


def test_index_file_missing_fields_named(tmp_path):
    (tmp_path / "image_index.json").write_text(json.dumps({"keys": ["a"]}))
    with pytest.raises(ValueError, match="missing the field"):
        ImageIndex.load(tmp_path)


# ----- metrics ---------------------------------------------------------------------------------------

def test_metrics_hand_computed():
    ranked = np.array([[3, 1, 2], [0, 0, 5], [-1, 4, 4], [7, 8, 9]])
    gold = [1, 5, 4, 6]
    assert gold_ranks(ranked, gold).tolist() == [2, 3, 2, 0]
    assert hits_at_k(ranked, gold, 1) == 0.0
    assert hits_at_k(ranked, gold, 2) == 0.5
    assert hits_at_k(ranked, gold, 3) == 0.75
    assert mrr_at_k(ranked, gold, 3) == pytest.approx((1 / 2 + 1 / 3 + 1 / 2 + 0) / 4)
    assert mrr_at_k(ranked, gold, 2) == pytest.approx((1 / 2 + 0 + 1 / 2 + 0) / 4)
    assert ranking_metrics(np.array([[5, 6]]), [5], ks=(1,), mrr_k=2) == {"hits@1": 1.0, "mrr@2": 1.0}


def test_compute_metrics_for_generation_counts_every_query(tokenizer):
    index = build_image_index(KEYS[:12], tokenizer, "naive")
    eos = index.eos_token_id

    def row(key):  # start token, id, eos, padding to 5
        tokens = [0] + index.labels_for(key)
        return tokens + [0] * (5 - len(tokens))

    garbage = [0, 99, 98, 0, 0]
    predictions = np.array([
        row(KEYS[1]), row(KEYS[0]),        # query 0 (gold 0): rank 2
        row(KEYS[3]), row(KEYS[3]),        # query 1 (gold 2): duplicate, gold absent -> miss
        garbage, row(KEYS[11]),            # query 2 (gold 11): invalid then gold: rank 2
    ])
    labels = np.array([index.labels_for(KEYS[0]) + [-100] * 2, index.labels_for(KEYS[2]) + [-100] * 2,
                       index.labels_for(KEYS[11]) + [-100]])
    from transformers import EvalPrediction

    metrics = compute_metrics_for_generation(index, num_return_sequences=2, ks=(1, 2))(
        EvalPrediction(predictions=predictions, label_ids=labels))
    assert metrics["hits@1"] == 0.0
    assert metrics["hits@2"] == pytest.approx(2 / 3)
    assert metrics["mrr@10"] == pytest.approx((0.5 + 0 + 0.5) / 3)
    assert eos == 1


def test_ranking_metrics_count_repeated_queries_once():
    from transformers import EvalPrediction

    from vit_t5_dsi.training.metrics import compute_ranking_metrics

    ranked = np.array([[1, 2], [3, 4], [1, 2], [9, 9]])  # row 2 repeats query 0 (distributed padding)
    labels = np.array([[1, 0], [4, 1], [1, 0], [5, 2]])  # (gold position, query id)
    metrics = compute_ranking_metrics(ks=(1, 2), mrr_k=2)(EvalPrediction(predictions=ranked, label_ids=labels))
    assert metrics["num_queries"] == 3
    assert metrics["hits@1"] == pytest.approx(1 / 3) and metrics["hits@2"] == pytest.approx(2 / 3)


def test_evaluate_metric_matches_the_pure_functions(tmp_path):
    import evaluate

    from vit_t5_dsi.training.hits_metric import RetrievalHits

    metric = RetrievalHits(cache_dir=str(tmp_path))
    metric.add_batch(predictions=[[3, 1, 2], [0, 0, 5]], references=[1, 5])
    metric.add_batch(predictions=[[-1, 4], [7]], references=[4, 6])  # ragged lists are padded with misses
    result = metric.compute(ks=[1, 2, 3], mrr_k=3)
    assert result == pytest.approx({"hits@1": 0.0, "hits@2": 0.5, "hits@3": 0.75,
                                    "mrr@3": (1 / 2 + 1 / 3 + 1 / 2 + 0) / 4})
    import vit_t5_dsi.training.hits_metric as module

    loaded = evaluate.load(module.__file__, cache_dir=str(tmp_path))  # the evaluate.load path, offline
    assert loaded.compute(predictions=[[5, 6]], references=[6], ks=[1, 2], mrr_k=2) == {
        "hits@1": 0.0, "hits@2": 1.0, "mrr@2": 0.5}


# ----- search exactness ------------------------------------------------------------------------------

class DesignedScores(LogitsProcessor):
    """A 'model' whose log-probabilities are a table keyed by the generated prefix (-50 elsewhere)."""

    def __init__(self, table):
        self.table = table

    def __call__(self, input_ids, scores):
        designed = torch.full_like(scores, -50.0)
        for row, ids in enumerate(input_ids[:, 1:].tolist()):
            for token, value in self.table.get(tuple(t for t in ids if t != 0), {}).items():
                designed[row, token] = value
        return designed


def test_beam_search_returns_the_true_top_k_under_ids_of_different_lengths(tokenizer):
    """A short id that finishes first with a poor score must not shut out longer, better ids (early stopping)."""
    a, b, x, w, y, eos = 10, 12, 13, 16, 14, tokenizer.eos_token_id
    index = ImageIndex(["a", "bx", "bwy"], ["a", "bx", "bwy"], [[a], [b, x], [b, w, y]], "naive", eos,
                       tokenizer.pad_token_id)
    # a (-0.3) finishes first, then bx (-0.52) while bw.. is still running at -0.36: stopping at two finished ids
    # returns [a, bx]; the true top 2 is [a, bwy] (-0.37)
    table = {(): {a: -0.1, b: -0.2}, (a,): {eos: -0.2}, (b,): {x: -0.12, w: -0.15}, (b, x): {eos: -0.2},
             (b, w): {y: -0.01}, (b, w, y): {eos: -0.01}}
    brute_force = {"a": -0.3, "bx": -0.52, "bwy": -0.37}  # sums of the table along each id
    model = ViTT5DSIForConditionalGeneration(tiny_config()).eval()
    text = tokenizer(["a red circle"], return_tensors="pt")
    ranking = rank_by_generation(model, index, k=2, input_ids=text.input_ids, attention_mask=text.attention_mask,
                                 logits_processor=LogitsProcessorList([DesignedScores(table)]))
    expected = sorted(brute_force, key=brute_force.get, reverse=True)[:2]
    assert [key for key, _ in ranking.keys(index)[0]] == expected
    np.testing.assert_allclose(ranking.scores[0], [brute_force[k] for k in expected], atol=1e-4)


def test_trie_never_allows_a_token_outside_the_models_vocabulary():
    trie = IdTrie([[5, 150], [5, 6], [7, 99], [7, 120]], eos_token_id=1, pad_token_id=0)
    scores = torch.randn(2, 100)
    masked = trie.mask_scores(trie.walk(np.array([[5], [7]])), scores)
    assert torch.isfinite(masked[0]).nonzero().flatten().tolist() == [6]  # 150 is not clipped onto 99
    assert torch.isfinite(masked[1]).nonzero().flatten().tolist() == [99]  # the real 99 keeps its score
    assert masked[1, 99] == scores[1, 99]


# ----- residual-quantized ids ---------------------------------------------------------------------------

def test_residual_quantization_codes_collisions_and_determinism():
    from vit_t5_dsi.identifiers.residual_quantization import residual_quantize

    embeddings = semantic_embeddings()
    embeddings[5] = embeddings[9] = embeddings[13] = embeddings[1]  # four identical images: one cell
    first = residual_quantize(embeddings, num_levels=2, codes_per_level=4, seed=3)
    again = residual_quantize(embeddings, num_levels=2, codes_per_level=4, seed=3)
    np.testing.assert_array_equal(first.codes, again.codes)
    assert first.codes.shape == (40, 2) and first.codes.max() < 4
    assert first.usage == [4, 4]
    # level 0 separates the four well-separated centres (images i, i+4, i+8, ... share one)
    assert all(len(set(first.codes[i::4, 0])) == 1 for i in range(4))
    assert len({int(first.codes[i, 0]) for i in range(4)}) == 4
    same = [1, 5, 9, 13]
    assert (first.extra[same] >= 0).all()
    groups = {}
    for row, group in enumerate(map(tuple, np.concatenate([first.codes, first.extra[:, None]], 1).tolist())):
        groups.setdefault(group, []).append(row)
    for members in groups.values():  # a position token only where the extra level could not separate
        assert bool((first.position[members] >= 0).all()) == (len(members) > 1)
    cells = {}
    for row, cell in enumerate(map(tuple, first.codes.tolist())):
        cells.setdefault(cell, []).append(row)
    for members in cells.values():  # the extra level only where images share all their codes
        assert bool((first.extra[members] >= 0).all()) == (len(members) > 1)
        assert bool((first.extra[members] < 0).all()) == (len(members) == 1)
    assert len({tuple(first.id_tokens(row)) for row in range(40)}) == 40
    summary = first.summary()
    assert summary["colliding_images"] == int((first.extra >= 0).sum()) >= 4
    assert summary["codes_used_per_level"] == [4, 4]
    assert summary["images_with_position_token"] == int((first.position >= 0).sum())


def test_rq_extra_level_separates_a_cell_with_meaningful_codes():
    from vit_t5_dsi.identifiers.residual_quantization import residual_quantize

    # two far-apart groups; inside each, two images differ only by a tiny offset along one of two directions
    base = np.array([[10.0, 0, 0, 0], [-10.0, 0, 0, 0]])
    offsets = np.array([[0, 0.01, 0, 0], [0, 0, 0.01, 0]])
    embeddings = np.array([b + o for b in base for o in offsets])
    codes = residual_quantize(embeddings, num_levels=1, codes_per_level=2)
    assert codes.codes[:, 0].tolist()[0] == codes.codes[:, 0].tolist()[1] != codes.codes[:, 0].tolist()[2]
    assert (codes.extra >= 0).all() and (codes.position < 0).all()
    # the same residual direction gets the same extra code in both cells: the token means something
    assert codes.extra[0] == codes.extra[2] and codes.extra[1] == codes.extra[3] and codes.extra[0] != codes.extra[1]


def test_rq_position_token_only_when_the_extra_level_cannot_separate():
    from vit_t5_dsi.identifiers.residual_quantization import residual_quantize

    codes = residual_quantize(np.ones((6, 4)), num_levels=2, codes_per_level=4)
    assert codes.summary()["images_with_position_token"] == 6 and sorted(codes.position.tolist()) == list(range(6))
    assert len({tuple(codes.id_tokens(row)) for row in range(6)}) == 6


def test_rq_ids_one_token_per_level_and_code(fresh_tokenizer):
    index = build(fresh_tokenizer, "rq")
    assert len(set(index.id_strings)) == len(KEYS)
    vocabulary = fresh_tokenizer.get_vocab()
    for id_string, tokens in zip(index.id_strings, index.token_ids):
        names = fresh_tokenizer.convert_ids_to_tokens(tokens)
        assert "".join(names) == id_string
        assert [name.split("_c")[0] for name in names][:2] == ["<l0", "<l1"]  # level by level
        assert len(tokens) in (2, 3, 4) and all(vocabulary[name] == t for name, t in zip(names, tokens))
    # one token per (level, code), shared by every image with that code: the trie stays small
    assert len(index.added_tokens) <= 4 + 4 + 4 + index.scheme_info["largest_shared_id"]
    assert index.scheme_info["num_levels"] == 2 and index.scheme_info["codes_per_level"] == [4, 4]
    again = build_image_index(KEYS, fresh_tokenizer, "rq", embeddings=semantic_embeddings(), rq_num_levels=2,
                             rq_codes_per_level=4)
    assert again.token_ids == index.token_ids  # deterministic; adding known tokens again changes nothing


def test_rq_index_round_trip_and_model_resize(tmp_path, fresh_tokenizer):
    index = build(fresh_tokenizer, "rq")
    index.save(tmp_path)
    loaded = ImageIndex.load(tmp_path)
    assert loaded.scheme == "rq" and loaded.scheme_info == index.scheme_info
    assert loaded.token_ids == index.token_ids and loaded.added_tokens == index.added_tokens
    loaded.check_tokenizer(fresh_tokenizer)
    model = ViTT5DSIForConditionalGeneration(tiny_config(vocab_size=160))
    loaded.resize_model_embeddings(model)
    assert model.get_input_embeddings().num_embeddings > loaded.max_token_id


def test_rq_scheme_refuses_bad_embeddings(tokenizer):
    with pytest.raises(ValueError, match="needs `embeddings`"):
        build_image_index(KEYS, tokenizer, "rq")
    with pytest.raises(ValueError, match="3 embedding rows for 40"):
        build_image_index(KEYS, tokenizer, "rq", embeddings=np.zeros((3, 4)))
    bad = semantic_embeddings()
    bad[7, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        build_image_index(KEYS, tokenizer, "rq", embeddings=bad)


def test_rq_ids_on_identical_embeddings_are_still_unique(fresh_tokenizer):
    index = build_image_index(KEYS, fresh_tokenizer, "rq", embeddings=np.ones((40, 8)), rq_num_levels=2, rq_codes_per_level=4)
    assert len(set(map(tuple, index.token_ids))) == 40
    assert index.scheme_info["colliding_images"] == 40 and index.scheme_info["codes_used_per_level"] == [1, 1]


def test_compute_ranking_metrics_reports_reranked_positions_under_their_own_keys():
    from transformers import EvalPrediction

    from vit_t5_dsi.training.metrics import compute_ranking_metrics

    generative = np.array([[2, 1], [4, 3], [5, 6]])
    reranked = np.array([[1, 2], [3, 4], [6, 5]])
    labels = np.array([[1, 0], [4, 1], [7, 2]])
    metrics = compute_ranking_metrics(ks=(1, 2), mrr_k=2)(
        EvalPrediction(predictions=np.stack([generative, reranked], axis=1), label_ids=labels))
    assert metrics["hits@1"] == pytest.approx(1 / 3) and metrics["hits@2"] == pytest.approx(2 / 3)
    assert metrics["rerank_hits@1"] == pytest.approx(1 / 3) and metrics["rerank_hits@2"] == pytest.approx(2 / 3)
    assert metrics["mrr@2"] == pytest.approx((0.5 + 1) / 3)
    assert metrics["rerank_mrr@2"] == pytest.approx((1 + 0.5) / 3)


@pytest.mark.parametrize("dim", [64, 16, 100])  # the model's width (64), narrower and wider embeddings
def test_rq_code_tokens_start_at_their_codes_vectors(fresh_tokenizer, dim):
    embeddings = np.random.default_rng(1).normal(size=(40, dim))
    index = build_image_index(KEYS, fresh_tokenizer, "rq", embeddings=embeddings, rq_num_levels=2, rq_codes_per_level=4)
    model = ViTT5DSIForConditionalGeneration(tiny_config(vocab_size=len(fresh_tokenizer)))
    index.resize_model_embeddings(model)
    weight = model.get_input_embeddings().weight
    norm = weight.norm(dim=1).mean().item()
    assert initialise_code_embeddings(index, model) == len(index.code_vectors) >= 8
    rows = list(index.code_vectors)
    vectors = np.stack([index.code_vectors[row] for row in rows])
    got = weight[rows].detach().numpy()
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), norm, rtol=1e-4)
    # the similarities between code tokens are those between the codes' vectors (an orthogonal map keeps them
    # when the widths differ, unless it has to drop dimensions)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    cosine = (got / np.linalg.norm(got, axis=1, keepdims=True))
    if dim <= 64:
        np.testing.assert_allclose(cosine @ cosine.T, unit @ unit.T, atol=1e-4)
    assert torch.equal(model.get_output_embeddings().weight[rows], weight[rows])  # tied: the output rows too
    loaded = ImageIndex.from_dict(index.to_dict())
    assert initialise_code_embeddings(loaded, model) == 0  # a loaded index never re-initialises trained rows


REMOTE_COLUMNS_LOAD = """
import sys
sys.modules["vit_t5_dsi"] = None  # the package cannot be imported: only the checkpoint's own code runs
import torch
from transformers import AutoModelForSeq2SeqLM
model = AutoModelForSeq2SeqLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
index = model.image_index
out = model.generate(pixel_values=torch.randn(2, 3, 32, 32), num_beams=4, num_return_sequences=4,
                     max_new_tokens=index.max_id_length, logits_processor=[index.logits_processor()])
positions = index.decode(out).reshape(2, 4)
assert (positions >= 0).all() and all(len(set(row)) == 4 for row in positions.tolist()), positions
assert index.keys[int(positions[0, 0])] in index.keys and "index_arrays" in type(index.keys).__module__
print("OK", len(index), index.id_strings[3])
"""


def test_a_columns_index_loads_with_the_checkpoints_own_code(tmp_path, fresh_tokenizer, monkeypatch):
    """The columns module travels flat with the checkpoint (remote code) and loads without the package."""
    import subprocess
    import sys

    import vit_t5_dsi.checkpoint.image_index_files as image_index

    monkeypatch.setattr(image_index, "JSON_LIMIT", 0)
    index = build(fresh_tokenizer, "rq")
    model = ViTT5DSIForConditionalGeneration(tiny_config(vocab_size=len(fresh_tokenizer))).eval()
    index.resize_model_embeddings(model)
    model.image_index = index
    model.save_pretrained(tmp_path)
    assert (tmp_path / "index_arrays.py").exists() and "arrays_file" in json.loads(
        (tmp_path / "image_index.json").read_text())
    script = tmp_path / "load.py"
    script.write_text(REMOTE_COLUMNS_LOAD)
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"OK 40 {index.id_strings[3]}" in result.stdout
