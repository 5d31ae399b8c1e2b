"""The seed's first step: the decoder writes captions, and generated captions index every image."""

import json
import os
import subprocess
import sys

import pytest
import torch

import run_dsi_image
from conftest import ROOT, tiny_args, tiny_config, write_images
from vit_t5_dsi.identifiers.build import build_image_index
from vit_t5_dsi import ImageIndex, ViTT5DSIForConditionalGeneration
from vit_t5_dsi.data.rows import CAPTIONING, PSEUDO_QUERY, RETRIEVAL, DSICollator, training_stream
from vit_t5_dsi.checkpoint.checkpoint_io import CollectionError
from vit_t5_dsi.training.pseudo_queries import PseudoQueries, RoundTripFilter
from vit_t5_dsi.checkpoint.ranking import rank_by_generation


@pytest.fixture
def captioning_model(tokenizer):
    import copy

    tokenizer = copy.deepcopy(tokenizer)
    model = ViTT5DSIForConditionalGeneration(tiny_config(vocab_size=len(tokenizer))).eval()
    model.enable_captioning(tokenizer)
    model.image_index = build_image_index([f"img{i}" for i in range(30)], tokenizer, "naive")
    return model, tokenizer


def test_captions_start_with_their_task_token_and_never_hold_identifier_tokens(captioning_model):
    model, tokenizer = captioning_model
    digits = tokenizer.convert_tokens_to_ids(list("0123456789"))
    model.config.caption_suppress_token_ids = digits
    tokens = model.caption(torch.randn(3, 3, 32, 32), max_new_tokens=8, do_sample=True, top_k=50,
                           num_return_sequences=4)
    assert tokens.shape[0] == 12
    assert not set(tokens.flatten().tolist()) & (set(digits) | {model.config.caption_token_id})
    # and the identifier search never writes the caption token
    text = tokenizer(["a red circle"], return_tensors="pt")
    ranking = rank_by_generation(model, model.image_index, k=5, input_ids=text.input_ids,
                                 attention_mask=text.attention_mask)
    assert (ranking.positions >= 0).all()


def test_identifier_only_tokens_are_those_no_training_caption_uses(tokenizer):
    index = build_image_index([f"img{i}" for i in range(30)], tokenizer, "naive")  # digit ids
    captions = tokenizer(["a red circle", "2 blue squares"], add_special_tokens=False)["input_ids"]
    forbidden = index.identifier_only_token_ids(captions)
    assert tokenizer.convert_tokens_to_ids("2") not in forbidden
    assert set(tokenizer.convert_tokens_to_ids(["0", "1", "3"])) <= set(forbidden)


def test_captioning_rows_train_the_same_decoder_in_a_mixed_batch(tmp_path, captioning_model):
    from vit_t5_dsi import ViTT5DSIProcessor
    from vit_t5_dsi.data.collection import load_karpathy
    from vit_t5_dsi.data.rows import ImageSource
    from vit_t5_dsi.data.splits import build_dsi_splits
    from vit_t5_dsi.data.synthetic_scenes import generate_scenes

    model, tokenizer = captioning_model
    path = generate_scenes(str(tmp_path), 20, image_size=32, seed=0, progress=False)
    splits = build_dsi_splits(load_karpathy(path, str(tmp_path / "images")), seen_captions_per_image=1)
    model.image_index = build_image_index(splits.index["image_key"][:], tokenizer, "naive")
    stream = training_stream(splits, "cross_attention", captioning_ratio=1.0)
    captioning = [row for row in stream if row["kind"] == CAPTIONING]
    assert sorted(r["caption"] for r in captioning) == sorted(splits.train_queries["caption"][:])
    processor = ViTT5DSIProcessor.for_model(model.config, tokenizer)
    collator = DSICollator(model.image_index, ImageSource(splits.index), processor, "cross_attention",
                           caption_token_id=model.config.caption_token_id)
    rows = [stream[i] for i in range(len(stream))][:24]
    batch = collator(rows)
    num_captioning = sum(r["kind"] == CAPTIONING for r in rows)
    assert num_captioning > 0
    labels = batch["labels"]
    starts = labels[:, 0].tolist()
    assert starts.count(model.config.caption_token_id) == num_captioning  # the task signal on caption rows only
    model.train()
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()


def test_pseudo_query_rows_read_the_current_store(tmp_path, captioning_model):
    from vit_t5_dsi import ViTT5DSIProcessor
    from vit_t5_dsi.data.rows import ImageSource

    model, tokenizer = captioning_model
    store = PseudoQueries()
    collator = DSICollator(model.image_index, ImageSource.__new__(ImageSource), ViTT5DSIProcessor.for_model(
        model.config, tokenizer), "cross_attention", pseudo_queries=store)
    rows = [{"image_key": "img3", "caption": "", "kind": PSEUDO_QUERY, "evaluate": False, "query_id": 0, "slot": 1}]
    assert collator._resolve_pseudo_queries(rows)[0]["kind"] != RETRIEVAL  # nothing written yet: indexed instead
    store.replace(PseudoQueries({"img3": ["a red circle", "a red circle ", "", "a small red circle"]}))
    resolved = collator._resolve_pseudo_queries(rows)[0]
    assert (resolved["kind"], resolved["caption"]) == (RETRIEVAL, "a small red circle")  # deduplicated, slot 1


def test_pseudo_query_files_name_their_bad_rows(tmp_path):
    path = tmp_path / "pq.jsonl"
    path.write_text(json.dumps({"image_id": "a", "caption": "fine"}) + "\n" +
                    json.dumps({"image_id": "zzz", "caption": "who"}) + "\n")
    with pytest.raises(CollectionError, match=r"pq.jsonl:2: image 'zzz' is not in the indexed collection"):
        PseudoQueries.load(str(path), known_keys=["a"])
    path.write_text(json.dumps({"image_id": "a", "caption": "  "}) + "\n")
    with pytest.raises(CollectionError, match=r"pq.jsonl:1: image 'a' has an empty caption"):
        PseudoQueries.load(str(path), known_keys=["a"])


MARKER = "zebra"


def marked_collection(tmp_path):
    """A JSONL collection whose evaluation captions all contain a word no training caption has."""
    names = [f"{i}.png" for i in range(30)]
    write_images(tmp_path / "imgs", names)
    colours, shapes = ["red", "blue", "green"], ["circle", "square"]
    train_rows = [{"image_id": str(i), "image": n} for i, n in enumerate(names)]
    for i in range(24):
        train_rows += [{"image_id": str(i), "caption": f"a {colours[i % 3]} {shapes[i % 2]} number {j}"}
                       for j in range(2)]
    validation = [{"image_id": str(i), "caption": f"a {MARKER} {colours[i % 3]} {shapes[i % 2]}"} for i in range(30)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in train_rows))
    (tmp_path / "validation.jsonl").write_text("\n".join(json.dumps(r) for r in validation))
    return ["--train_file", str(tmp_path / "train.jsonl"), "--validation_file", str(tmp_path / "validation.jsonl"),
            "--image_dir", str(tmp_path / "imgs")]


def test_no_evaluation_caption_reaches_any_training_path(tmp_path, monkeypatch):
    """Retrieval, captioning and pseudo-query rows, across a one-command run that writes pseudo-queries."""
    trained = []
    resolve = DSICollator._resolve_pseudo_queries

    def recording(self, rows):
        resolved = resolve(self, rows)
        if not rows[0]["evaluate"]:
            trained.extend(r["caption"] for r in resolved if r["kind"] in (RETRIEVAL, CAPTIONING))
        return resolved

    monkeypatch.setattr(DSICollator, "_resolve_pseudo_queries", recording)
    metrics = run_dsi_image.main(tiny_args(tmp_path, *marked_collection(tmp_path), "--num_train_epochs", "4",
                                           "--captioning_ratio", "1.0", "--pseudo_query_epochs", "2",
                                           "--num_pseudo_queries", "4", "--pseudo_query_images", "all"))
    evaluation = [json.loads(line)["caption"] for line in (tmp_path / "validation.jsonl").read_text().splitlines()]
    pseudo = [json.loads(line)["caption"] for line in (tmp_path / "out" / "pseudo_queries.jsonl").read_text().splitlines()]
    assert pseudo and len(trained) > 100
    assert set(pseudo) <= set(trained)  # every pseudo-query was trained on
    assert not set(evaluation) & set(trained)
    assert not any(MARKER in caption for caption in trained + pseudo)
    protocol = json.loads((tmp_path / "out" / "protocol.json").read_text())
    assert protocol["pseudo_queries"]["num_pseudo_queries"] == len(pseudo) and protocol["captioning_rows_per_epoch"]
    assert 0.0 <= metrics["eval_caption_bleu"] <= 100.0 and metrics["eval_caption_num_images"] == 6


def test_standalone_pseudo_queries_resume_and_train(tmp_path):
    run_dsi_image.main(tiny_args(tmp_path, "--max_steps", "3", "--do_eval", "False", "--captioning_ratio", "0.5"))
    from PIL import Image

    from vit_t5_dsi import DSIRetriever

    captions = DSIRetriever.from_pretrained(str(tmp_path / "out"), device="cpu").caption(
        [Image.new("RGB", (64, 64), (255, 0, 0)), Image.new("RGBA", (40, 40))])
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    output = tmp_path / "pq.jsonl"
    script = [sys.executable, os.path.join(ROOT, "data_scripts", "generate_pseudo_queries.py"), "--model",
              str(tmp_path / "out"), "--output", str(output), "--num_queries", "3", "--batch_size", "8",
              "--demo_dir", str(tmp_path / "data"), "--demo_num_images", "40"]
    first = subprocess.run(script, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    lines = output.read_text().splitlines()
    keys = {json.loads(line)["image_id"] for line in lines}
    assert len(keys) == 40
    # an interrupted run: half the rows and a torn line; the rerun completes only what is missing
    kept = [line for line in lines if int(json.loads(line)["image_id"].split("_")[1].split(".")[0]) < 20]
    output.write_text("\n".join(kept) + '\n{"image_id": "scene_0')
    again = subprocess.run(script, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert {r["image_id"] for r in rows} == keys
    assert len(rows) == len({(r["image_id"], r["caption"]) for r in rows})  # nothing written twice
    metrics = run_dsi_image.main(tiny_args(tmp_path, "--output_dir", str(tmp_path / "with_pq"), "--max_steps", "3",
                                           "--pseudo_queries", str(output)))
    assert "eval_hits@1" in metrics
    protocol = json.loads((tmp_path / "with_pq" / "protocol.json").read_text())
    assert protocol["pseudo_queries"]["num_pseudo_queries"] == len(rows)
    assert str(tmp_path / "out") in protocol["pseudo_queries"]["source"]
    assert f"{len(rows)} pseudo-queries for" in (tmp_path / "with_pq" / "README.md").read_text()  # the model card


def test_pseudo_queries_are_written_for_uncaptioned_images_unless_told_otherwise():
    from vit_t5_dsi.training.arguments import DataArguments, ModelArguments
    from vit_t5_dsi.training.recipe import NUM_PSEUDO_QUERIES, RECIPE_PSEUDO_QUERIES, resolve_recipe

    model_args, data_args = ModelArguments(), DataArguments(karpathy_json="data.json", image_dir=".")
    resolve_recipe(model_args, data_args)
    assert {name: getattr(data_args, name) for name in RECIPE_PSEUDO_QUERIES} == RECIPE_PSEUDO_QUERIES
    opted_out = DataArguments(captioning_ratio=0.0)
    resolve_recipe(ModelArguments(), opted_out)
    assert opted_out.pseudo_query_at is None and opted_out.pseudo_query_filter_top_k == 0
    not_written = DataArguments(pseudo_query_at="none")
    resolve_recipe(ModelArguments(), not_written)
    assert not_written.captioning_ratio == 0.5 and not_written.pseudo_query_at == "none"
    by_epoch = DataArguments(pseudo_query_epochs="5")  # epochs named: no fractions on top
    resolve_recipe(ModelArguments(), by_epoch)
    assert by_epoch.pseudo_query_at is None
    assert by_epoch.pseudo_query_filter_top_k == RECIPE_PSEUDO_QUERIES["pseudo_query_filter_top_k"]
    from_file = DataArguments(pseudo_queries="pq.jsonl")
    resolve_recipe(ModelArguments(), from_file)
    assert from_file.captioning_ratio == 0.0 and from_file.pseudo_query_at is None
    unfiltered = DataArguments()
    resolve_recipe(ModelArguments(dense_first=False), unfiltered)  # no dual encoder to filter with
    assert unfiltered.pseudo_query_at == "0.2" and unfiltered.pseudo_query_filter_top_k == 0
    # 30 written per image and copies dropped only where the filter runs; flags given are kept
    assert unfiltered.num_pseudo_queries == NUM_PSEUDO_QUERIES and unfiltered.pseudo_query_drop_copies is False
    given = DataArguments(num_pseudo_queries=5, pseudo_query_drop_copies=False)
    resolve_recipe(ModelArguments(), given)
    assert given.num_pseudo_queries == 5 and given.pseudo_query_drop_copies is False
    dense = DataArguments()
    resolve_recipe(ModelArguments(variant="dual_encoder"), dense)
    assert dense.captioning_ratio == 0.0 and dense.pseudo_query_at is None


def test_pseudo_query_fractions_become_epoch_boundaries():
    from vit_t5_dsi.training.pseudo_queries import epochs_for_fractions

    assert epochs_for_fractions([0.2], 150) == [30]  # the demo's refresh
    assert epochs_for_fractions([0.2, 0.5], 10) == [2, 5]
    assert epochs_for_fractions([0.9], 3) == [2]  # never at the end of training
    assert epochs_for_fractions([0.2], 1) == []  # one epoch has no boundary to write them at


class _RanksByText:
    """A stand-in dual encoder for RoundTripFilter: each text's rank of its own image is given."""

    def __init__(self, ranks: dict[str, int]):
        self.ranks, self.seen_texts = ranks, []

    def gold_ranks(self, texts, gold_positions, index):
        self.seen_texts.extend(texts)
        return torch.tensor([self.ranks[text] for text in texts]).numpy()


class _Positions:
    def positions_of(self, keys):
        return torch.arange(len(keys)).numpy()


def test_round_trip_filter_drops_copies_of_another_images_training_caption():
    """A pseudo-query that is another image's training caption (case and spacing ignored) is dropped before the
    round trip and is never an image's fallback: it would give that caption a second label."""
    ranks = {"a red circle": 0, "a blue square": 0, "a red  Square": 0, "a green diamond": 0, "a tiny dot": 2}
    reranker = _RanksByText(ranks)
    training = {"train1": ["a red square", "centre: red square"], "held2": ["a green diamond"]}
    keep = RoundTripFilter(reranker, _Positions(), top_k=1, training_captions=training)
    kept = keep({"held1": ["a red circle", "a red  Square"], "held2": ["a green diamond", "a tiny dot"],
                 "held3": ["a blue square"]})
    # held1 loses the copy of train1's caption though the dual encoder ranked held1 first for it;
    # held2's own training caption is not a copy; held3 keeps its passing query
    assert kept == {"held1": ["a red circle"], "held2": ["a green diamond"], "held3": ["a blue square"]}
    assert "a red  Square" not in reranker.seen_texts
    assert keep.last_summary["filter_copies_dropped"] == 1 and keep.last_summary["filter_written"] == 5
    # an image whose only queries are copies keeps none (it is then indexed only), not a copy as its fallback
    assert keep({"held4": ["A red square"]}) == {}
    # without training captions nothing counts as a copy (the filter as before)
    assert RoundTripFilter(_RanksByText(ranks), _Positions(), top_k=1)({"held1": ["a red  Square"]}) == {
        "held1": ["a red  Square"]}
