"""One search vocabulary and behaviour across Python (`DSIRetriever`), the pipeline, the CLI and the app: `top_k`,
`image_key`, re-ranking on by default wherever the checkpoint carries its `dual_encoder/` (locally or on the Hub),
off with one switch. Tiny untrained checkpoints: the surfaces must agree with each other, not be good."""

import configparser
import json
import os
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CAPTIONS, ROOT, tiny_config
from vit_t5_dsi import DSIRetriever, ViTT5DSIProcessor, build_image_index, load_dsi_model, model_class_for_variant
from vit_t5_dsi.checkpoint.loading import load_dense_reranker

TASK = "text-to-image-retrieval"
QUERY = "a large red circle in the top left"
NUM_IMAGES = 6
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange"]


def save_checkpoint(folder, tokenizer, variant, keys, paths=None):
    model = model_class_for_variant(variant)(tiny_config(variant))
    model.image_index = build_image_index(keys, tokenizer, "naive")
    if paths is not None:
        model.image_index.record_image_paths(paths)
    if variant == "dual_encoder":
        with torch.no_grad():
            model.image_index.embeddings = model.encode_images(torch.rand(len(keys), 3, 32, 32))
    model.save_pretrained(folder)
    ViTT5DSIProcessor.for_model(model.config, tokenizer).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer):
    """A generative checkpoint carrying its dual encoder (`run/dual_encoder`), the same without it (`plain`), and
    the dual encoder alone; 6 images on disk."""
    root = tmp_path_factory.mktemp("search")
    images = root / "images"
    images.mkdir()
    keys = [f"scene_{i}.png" for i in range(NUM_IMAGES)]
    for key, colour in zip(keys, COLOURS):
        Image.new("RGB", (32, 32), colour).save(images / key)
    paths = [str(images / key) for key in keys]
    torch.manual_seed(0)
    plain = save_checkpoint(root / "plain", tokenizer, "cross_attention", keys, paths)
    run = root / "run"
    shutil.copytree(plain, run)
    dense = save_checkpoint(run / "dual_encoder", tokenizer, "dual_encoder", keys, paths)
    return {"root": root, "images": str(images), "keys": keys, "plain": plain, "run": str(run), "dense": dense}


def keys_of(hits):
    return [hit["image_key"] for hit in hits]


def in_process_pipeline(checkpoint, **kwargs):
    from transformers import pipeline

    return pipeline(TASK, model=load_dsi_model(checkpoint), processor=ViTT5DSIProcessor.from_pretrained(checkpoint),
                    device="cpu", **kwargs)


# ----- Python and the pipeline -------------------------------------------------------------------------------
def test_the_checkpoints_dual_encoder_reranks_by_default_in_python_and_the_pipeline(tiny):
    default = DSIRetriever.from_pretrained(tiny["run"], device="cpu")
    explicit = DSIRetriever.from_pretrained(tiny["run"], device="cpu", rerank_with=tiny["dense"])
    off = DSIRetriever.from_pretrained(tiny["run"], device="cpu", rerank=False)
    assert default.reranker is not None and off.reranker is None
    assert default.search(QUERY, top_k=4) == explicit.search(QUERY, top_k=4)
    plain = DSIRetriever.from_pretrained(tiny["plain"], device="cpu")
    assert plain.reranker is None and off.search(QUERY, top_k=4) == plain.search(QUERY, top_k=4)
    # the per-call switch and the load-time one agree
    assert default.search(QUERY, top_k=4, rerank=False) == off.search(QUERY, top_k=4)

    search = in_process_pipeline(tiny["run"])
    assert search.reranker is not None
    hits = search(QUERY, top_k=4)
    assert keys_of(hits) == keys_of(default.search(QUERY, top_k=4))
    assert [h["score"] for h in hits] == pytest.approx([h["score"] for h in default.search(QUERY, top_k=4)],
                                                       abs=1e-4)
    assert keys_of(search(QUERY, top_k=4, rerank=False)) == keys_of(off.search(QUERY, top_k=4))
    assert in_process_pipeline(tiny["run"], rerank=False).reranker is None
    assert in_process_pipeline(tiny["plain"]).reranker is None


def test_results_have_one_shape_everywhere(tiny):
    retriever = DSIRetriever.from_pretrained(tiny["run"], device="cpu")
    for hits in (retriever.search(QUERY, top_k=3), in_process_pipeline(tiny["run"])(QUERY, top_k=3)):
        assert [set(hit) for hit in hits] == [{"image_key", "score", "path"}] * 3
        assert all(hit["path"] == os.path.join(tiny["images"], hit["image_key"]) for hit in hits)
    image = Image.open(os.path.join(tiny["images"], tiny["keys"][0]))
    batch = retriever.search([QUERY, image, "a small blue square"], top_k=2, batch_size=2)
    assert len(batch) == 3 and all(len(hits) == 2 for hits in batch)
    assert batch[1] == retriever.search(image, top_k=2)
    assert retriever.retrieve([QUERY], top_k=3)[0] == [(h["image_key"], h["score"])
                                                        for h in retriever.search(QUERY, top_k=3)]
    with pytest.warns(FutureWarning, match="top_k"):
        assert len(retriever.retrieve(QUERY, k=2)[0]) == 2


def test_rerank_switches_are_checked(tiny):
    with pytest.raises(ValueError, match="dual_encoder/"):
        DSIRetriever.from_pretrained(tiny["plain"], device="cpu", rerank=True)
    with pytest.raises(ValueError, match="rerank=False"):
        DSIRetriever.from_pretrained(tiny["run"], device="cpu", rerank=False, rerank_with=tiny["dense"])
    with pytest.raises(ValueError, match="ranks by itself"):
        DSIRetriever.from_pretrained(tiny["dense"], device="cpu", rerank=True)
    with pytest.raises(ValueError, match=r"rerank_weight must be in \[0, 1\]"):
        DSIRetriever.from_pretrained(tiny["plain"], device="cpu", rerank_weight=2.0)
    with pytest.raises(ValueError, match="rerank=True"):
        in_process_pipeline(tiny["plain"])(QUERY, rerank=True)
    retriever = DSIRetriever.from_pretrained(tiny["plain"], device="cpu")
    with pytest.raises(ValueError, match="top_k"):
        retriever.search(QUERY, top_k=0)
    with pytest.raises(TypeError, match="a string or an image"):
        retriever.search([QUERY, 42])
    with pytest.raises(ValueError, match="empty"):
        retriever.search("  ")


# ----- the Hub ---------------------------------------------------------------------------------------------------
def fake_hub_repo(source, repo_id, missing=()):
    """`source` as the Hub cache holds a downloaded repo (offline mode reads it like the Hub): a snapshot, the ref
    `main`, and `.no_exist` markers for files the Hub said the repo lacks."""
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = os.path.join(constants.HF_HUB_CACHE, "models--" + repo_id.replace("/", "--"))
    shutil.copytree(source, os.path.join(repo, "snapshots", commit))
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)
    for name in missing:
        marker = os.path.join(repo, ".no_exist", commit, name)
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        open(marker, "w").close()
    return repo_id


def test_reranking_from_the_hub_uses_the_dual_encoder_subfolder(tiny, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with_dense = fake_hub_repo(tiny["run"], "tester/tiny-dsi-with-dense", missing=["image_embeddings.safetensors"])
    without = fake_hub_repo(tiny["plain"], "tester/tiny-dsi-plain",
                            missing=["image_embeddings.safetensors", "dual_encoder/config.json"])
    local = DSIRetriever.from_pretrained(tiny["run"], device="cpu").search(QUERY, top_k=4)
    hub = DSIRetriever.from_pretrained(with_dense, device="cpu")
    assert hub.reranker is not None and keys_of(hub.search(QUERY, top_k=4)) == keys_of(local)
    assert DSIRetriever.from_pretrained(without, device="cpu").reranker is None
    # the documented spellings of the Hub folder both load it
    for reranker in (load_dense_reranker(with_dense, subfolder="dual_encoder"),
                     load_dense_reranker(f"{with_dense}/dual_encoder")):
        assert reranker.model.config.is_dual_encoder
    from transformers import pipeline

    remote = pipeline(TASK, model=with_dense, trust_remote_code=True, device="cpu")
    assert remote.reranker is not None and keys_of(remote(QUERY, top_k=4)) == keys_of(local)


# ----- the CLI -----------------------------------------------------------------------------------------------
def cli(*argv):
    import retrieve_images

    return retrieve_images.main(list(argv))


def test_the_cli_prints_paths_and_writes_jsonl_for_text_and_image_queries(tiny, tmp_path, capsys):
    moved = tmp_path / "moved"
    shutil.copytree(tiny["images"], moved)
    output = tmp_path / "out" / "results.jsonl"
    image = os.path.join(tiny["images"], tiny["keys"][2])
    assert cli("--model", tiny["run"], "--top_k", "3", "--image_dir", str(moved), "--output", str(output),
               "--image", image, QUERY) == 0
    printed = capsys.readouterr()
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [(r["query"], r["type"]) for r in records] == [(QUERY, "text"), (image, "image")]
    expected = DSIRetriever.from_pretrained(tiny["run"], device="cpu", image_dir=str(moved))
    assert records[0]["results"] == pytest.approx(expected.search(QUERY, top_k=3))
    for record in records:
        assert len(record["results"]) == 3
        for hit in record["results"]:
            assert set(hit) == {"image_key", "score", "path"} and hit["path"] == str(moved / hit["image_key"])
            assert hit["path"] in printed.out
    assert "re-ranked by the dual encoder" in printed.err


def test_the_cli_keeps_k_and_turns_reranking_off(tiny, tmp_path, capsys):
    with pytest.warns(FutureWarning, match="--top_k"):
        cli("--model", tiny["run"], "--k", "2", "--json", "--no_rerank", QUERY)
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    off = DSIRetriever.from_pretrained(tiny["run"], device="cpu", rerank=False).search(QUERY, top_k=2)
    assert record["results"] == pytest.approx(off)


def test_the_cli_exports_the_dual_encoders_embeddings_in_index_order(tiny, tmp_path):
    target = tmp_path / "emb.npy"
    assert cli("--model", tiny["run"], "--export_embeddings", str(target)) == 0  # no query: no stdin read
    keys = (tmp_path / "emb.keys.txt").read_text().splitlines()
    index = load_dsi_model(tiny["run"]).image_index
    dense = load_dsi_model(tiny["dense"]).image_index
    assert keys == list(index.keys)
    np.testing.assert_allclose(np.load(target), dense.embeddings_for(keys).numpy(), atol=1e-6)
    assert cli("--model", tiny["dense"], "--export_embeddings", str(tmp_path / "own.npy")) == 0
    np.testing.assert_allclose(np.load(tmp_path / "own.npy"), dense.embeddings.numpy(), atol=1e-6)


@pytest.mark.parametrize("argv, flag", [
    (["--image", "no/such.png"], "--image"),
    (["--top_k", "0", QUERY], "--top_k"),
    (["--export_embeddings", "emb.txt"], "--export_embeddings"),
    (["--no_rerank", "--rerank_with", "x", QUERY], "--no_rerank"),
    (["--image_dir", "no/such/dir", QUERY], "--image_dir"),
    (["--k", "2", "--top_k", "3", QUERY], "--k"),
])
def test_the_cli_refuses_bad_input_naming_the_flag(tiny, capsys, argv, flag):
    with pytest.raises(SystemExit) as exit_info:
        cli("--model", tiny["plain"], *argv)
    assert exit_info.value.code == 2 and flag in capsys.readouterr().err


def test_the_cli_refuses_to_export_from_a_checkpoint_without_a_dual_encoder(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli("--model", tiny["plain"], "--export_embeddings", str(tmp_path / "e.npy"))
    assert "--export_embeddings" in capsys.readouterr().err and not (tmp_path / "e.npy").exists()


# ----- CLIP's names ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["cross_attention", "codebook", "dual_encoder"])
def test_get_text_and_image_features_on_every_variant(tokenizer, variant):
    model = model_class_for_variant(variant)(tiny_config(variant)).eval()
    processor = ViTT5DSIProcessor.for_model(model.config, tokenizer)
    with torch.no_grad():
        texts = model.get_text_features(**processor(text=CAPTIONS[:3]))
        images = model.get_image_features(**processor(images=[Image.new("RGB", (40, 40), c) for c in COLOURS[:2]]))
    assert texts.pooler_output.shape[0] == 3 and images.pooler_output.shape[0] == 2
    assert texts.pooler_output.shape[1] == images.pooler_output.shape[1]
    for features in (texts, images):
        assert features.last_hidden_state.dim() == 3
        torch.testing.assert_close(features.pooler_output.norm(dim=-1), torch.ones(len(features.pooler_output)))
    if variant == "dual_encoder":  # exactly what the index is searched with
        batch = processor(text=CAPTIONS[:3])
        torch.testing.assert_close(texts.pooler_output, model.encode_texts(batch["input_ids"],
                                                                           batch["attention_mask"]))


# ----- the app -----------------------------------------------------------------------------------------------
def sentencepiece_style_tokenizer():
    """Words stored as `▁word`, as T5's SentencePiece vocabulary holds them."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "▁": 3, "▁a": 4, "▁circle": 5, "▁red": 6, "▁tri": 7,
             "angle": 8,
             **{c: 9 + i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")}}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="<unk>", continuing_subword_prefix=""))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>")


def test_unknown_words_are_only_the_ones_the_tokenizer_cannot_read(tokenizer):
    from vit_t5_dsi.search.app import unknown_words

    # the collection's BPE: "circles" is "circle ##s", "squares," has punctuation: known; "zebra" is not
    assert unknown_words(tokenizer, "Circles and squares, a red circle!") == []
    assert unknown_words(tokenizer, "a large zebra") == ["zebra"]
    assert unknown_words(tokenizer, "一 café") == ["一", "café"]
    spm = sentencepiece_style_tokenizer()
    assert unknown_words(spm, "a red circle triangle") == []  # "▁circle", "▁tri" + "angle"
    assert unknown_words(spm, "a red xyz") == ["xyz"]  # letter by letter: no piece of it was learned


def test_the_app_honours_gradios_environment_and_keeps_old_rerank_spellings(tiny):
    from vit_t5_dsi.search.app import parse_args

    args = parse_args(["--model", tiny["plain"]])
    assert args.host is None and args.port is None  # Gradio then reads GRADIO_SERVER_NAME / GRADIO_SERVER_PORT
    assert parse_args(["--model", tiny["plain"], "--port", "9000"]).port == 9000
    with pytest.warns(FutureWarning, match="--no_rerank"):
        assert parse_args(["--model", tiny["plain"], "--rerank_with", "none"]).no_rerank
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        args = parse_args(["--model", tiny["plain"], "--rerank_with", "auto"])
    assert args.rerank_with is None and not args.no_rerank


def parquet_collection(folder, keys, colours):
    """Flickr30K's Hub layout (image bytes, caption list, split, filename) in one parquet file."""
    import io

    import datasets

    def png(colour):
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), colour).save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    table = datasets.Dataset.from_dict(
        {"image": [png(c) for c in colours], "caption": [[f"a {c} square"] for c in colours],
         "split": ["train"] * len(keys), "filename": keys},
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Sequence(datasets.Value("string")),
                                    "split": datasets.Value("string"), "filename": datasets.Value("string")}))
    os.makedirs(folder, exist_ok=True)
    table.to_parquet(os.path.join(folder, "data.parquet"))
    return str(folder)


def test_the_app_shows_images_of_a_collection_held_as_bytes(tiny, tokenizer, tmp_path):
    from vit_t5_dsi.search.app import SearchPage, load_search_pipeline
    from vit_t5_dsi.search.collection_images import images_for

    data = parquet_collection(tmp_path / "parquet", tiny["keys"], COLOURS)
    checkpoint = save_checkpoint(tmp_path / "ckpt", tokenizer, "cross_attention", tiny["keys"])  # records no files
    search = load_search_pipeline(checkpoint, "cpu")
    assert search.image_index.image_files is None
    images, note = images_for(checkpoint, search.image_index)
    assert images is None and "--dataset_name" in note  # nothing says where the collection is
    gallery, message = SearchPage(search, images_note=note)(QUERY, None, 3)
    assert gallery == [] and "--dataset_name" in message
    # run_dsi_image.py records the collection in protocol.json: a local parquet folder is found on its own
    (tmp_path / "ckpt" / "protocol.json").write_text(json.dumps({"source": data}))
    images, note = images_for(checkpoint, search.image_index)
    assert images is not None and note == ""
    gallery, message = SearchPage(search, collection_images=images)(QUERY, None, 3)
    assert len(gallery) == 3 and all(isinstance(picture, Image.Image) for picture, _ in gallery)
    for picture, caption in gallery:  # each hit shows its own image
        assert picture.getpixel((0, 0)) == Image.new("RGB", (1, 1), COLOURS[tiny["keys"].index(
            caption.split(" · ")[0])]).getpixel((0, 0))
    # a Hub dataset is not downloaded unasked: the note names the flag
    (tmp_path / "ckpt" / "protocol.json").write_text(json.dumps({"source": "someone/flickr30k"}))
    images, note = images_for(checkpoint, search.image_index)
    assert images is None and "--dataset_name someone/flickr30k" in note
    with pytest.raises(ValueError, match="none of the 6 indexed images"):
        images_for(checkpoint, search.image_index, parquet_collection(tmp_path / "other", ["x.png"], ["red"]))


# ----- packaging and the card --------------------------------------------------------------------------------
def test_the_distribution_installs_no_top_level_app_module():
    config = configparser.ConfigParser()
    config.read(os.path.join(ROOT, "setup.cfg"))
    modules = [m.strip() for m in config["options"]["py_modules"].split(",")]
    assert "app" not in modules and all(os.path.isfile(os.path.join(ROOT, f"{m}.py")) for m in modules)
    scripts = dict(line.split(" = ") for line in config["options.entry_points"]["console_scripts"].strip().splitlines())
    module, function = scripts["vit-t5-dsi-app"].split(":")
    import importlib

    assert callable(getattr(importlib.import_module(module), function))


def test_the_card_shows_a_query_of_the_collection_reranking_and_no_local_dataset_tag(tiny, tmp_path):
    import datasets

    from vit_t5_dsi.training.model_card import example_query, render_model_card

    model = load_dsi_model(tiny["plain"])
    sets = {"seen": datasets.Dataset.from_dict({"caption": ["a seen caption"]}),
            "eval": datasets.Dataset.from_dict({"caption": ["  a  held-out caption "]})}
    assert example_query(sets) == "a held-out caption" and example_query({"seen": sets["seen"]}) == "a seen caption"
    local = tmp_path / "parquet"
    local.mkdir()
    card = render_model_card(model, {}, "tiny", "user/tiny", "data", "training", str(local),
                             example_query=example_query(sets))
    assert 'search("a held-out caption", top_k=5)' in card and "a large red circle" not in card
    assert "rerank=False" in card and "dual_encoder/" in card
    assert "datasets:" not in card and str(local) not in card
    card = render_model_card(model, {}, "tiny", "user/tiny", "data", "training", "nlphuji/flickr30k")
    assert "datasets:\n- nlphuji/flickr30k\n" in card
    dense_card = render_model_card(load_dsi_model(tiny["dense"]), {}, "tiny", "user/tiny", "data", "training")
    assert "rerank=False" not in dense_card and "Re-ranking" not in dense_card
