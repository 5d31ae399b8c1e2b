"""Adding and removing images in a trained checkpoint (vit_t5_dsi.updates, update_index.py), on one tiny recipe run."""

import glob
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import run_dsi_image
import update_index
from conftest import tiny_args
from vit_t5_dsi import DSIRetriever, ImageIndex, add_images, build_image_index, load_dsi_model, remove_images
from vit_t5_dsi.checkpoint.checkpoint_io import UsageError
from vit_t5_dsi.identifiers.new_ids import ids_for_new_images
from vit_t5_dsi.identifiers.residual_quantization import quantize_with_codebooks, residual_quantize
from vit_t5_dsi.updates import short_update as short_update_module
from vit_t5_dsi.updates.add_images import read_replay_captions


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The default recipe (rq ids from a dual encoder trained first, captioning, pseudo-queries, re-ranking) on 30
    demo scenes, trained briefly: what the updates need, not a good model."""
    tmp = tmp_path_factory.mktemp("recipe")
    run_dsi_image.main(tiny_args(tmp, "--docid_scheme", "rq", "--dense_first", "True", "--captioning_ratio", "0.5",
                                 "--pseudo_query_at", "0.5", "--max_index_eval_images", "0", images=30, epochs=2))
    images = sorted(glob.glob(str(tmp / "data" / "*" / "images" / "*.png")))
    return str(tmp / "out"), images


@pytest.fixture
def checkpoint(trained, tmp_path):
    """A private copy of the trained checkpoint (tests update it in place)."""
    shutil.copytree(trained[0], tmp_path / "ckpt")
    return str(tmp_path / "ckpt")


def new_pictures(images, count, tag):
    """New images: rotated copies of demo scenes (pixels the model never saw), and one exact copy of an indexed
    scene (its code is taken: it needs a collision suffix)."""
    pictures = {f"{tag}_{i}": Image.open(images[i]).convert("RGB").rotate(90 * (1 + i % 3)) for i in range(count - 1)}
    pictures[f"{tag}_copy"] = Image.open(images[0]).convert("RGB")
    return pictures


def queries(retriever, k):
    texts = ["a red circle", "a blue square in the top left", "a small green triangle", "a yellow star"]
    return {key for result in retriever.retrieve(texts, top_k=k) for key, _ in result}


def test_frozen_codebooks_reproduce_the_build_codes_and_travel_with_the_checkpoint(trained):
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(60, 8))
    codes = residual_quantize(embeddings, 3, 4, seed=0)
    again, _ = quantize_with_codebooks(embeddings, codes.centers, 3)
    assert (again == codes.codes).all()
    index = load_dsi_model(trained[0]).image_index
    assert index.scheme == "rq" and len(index.codebooks) >= 3
    assert os.path.isfile(os.path.join(trained[0], "rq_codebooks.safetensors"))


def test_added_images_are_indexed_searchable_and_the_checkpoint_loads_everywhere(checkpoint, trained, tmp_path):
    before = load_dsi_model(checkpoint).image_index
    out = str(tmp_path / "added")
    record = add_images(checkpoint, new_pictures(trained[1], 4, "new"), output_dir=out)
    assert record["num_indexed"] == len(before) + 4 and record["ids_with_collision_suffix"] >= 1
    model = load_dsi_model(out)
    index = model.image_index
    assert len(index) == len(before) + 4 and list(index.keys)[:len(before)] == list(before.keys)
    assert len(set(index.id_strings)) == len(index)  # the copy of an indexed scene got an id of its own
    dual = load_dsi_model(os.path.join(out, "dual_encoder")).image_index
    assert set(dual.keys) == set(index.keys) and len(dual.embeddings) == len(index)
    # searchable: the new ids are in the trie (k = every image returns them), re-ranking has their embeddings
    retriever = DSIRetriever.from_pretrained(out, device="cpu", rerank=True)
    assert {"new_0", "new_copy"} <= {key for key, _ in retriever.retrieve(["a red circle"], top_k=len(index))[0]}
    from transformers import pipeline

    found = pipeline("text-to-image-retrieval", model=out, trust_remote_code=True, device="cpu")("a red circle",
                                                                                                 top_k=len(index))
    assert {"new_1"} <= {hit["image_key"] for hit in found}
    card = open(os.path.join(out, "README.md")).read()
    assert "Images added and removed since training" in card and "| add 4" in card
    assert json.load(open(os.path.join(out, "index_updates.json")))[0]["num_images"] == 4
    assert len(load_dsi_model(checkpoint).image_index) == len(before)  # the source is left as it was


def test_bad_input_is_an_error_naming_the_key_file_or_flag(checkpoint, trained, tmp_path):
    indexed = list(load_dsi_model(checkpoint).image_index.keys)
    with pytest.raises(UsageError, match=indexed[0]):
        add_images(checkpoint, {indexed[0]: trained[1][0]}, output_dir=str(tmp_path / "a"))
    with pytest.raises(UsageError, match="not_there"):
        remove_images(checkpoint, ["not_there"], output_dir=str(tmp_path / "b"))
    with pytest.raises(UsageError, match="overwrite_output_dir"):
        remove_images(checkpoint, [indexed[0]])  # in place only when asked
    with pytest.raises(UsageError, match="no_such_folder"):
        add_images(checkpoint, str(tmp_path / "no_such_folder"), output_dir=str(tmp_path / "c"))
    with pytest.raises(UsageError, match="evaluation queries only"):
        read_replay_captions({"new_0": ["its real caption"]}, indexed, ["new_0"])
    with pytest.raises(UsageError, match="semantic"):
        from conftest import CAPTIONS  # noqa: F401  (the tokenizer fixture's captions)
        from vit_t5_dsi.data.caption_tokenizer import train_caption_tokenizer

        tokenizer = train_caption_tokenizer(CAPTIONS * 4, vocab_size=160)
        index = build_image_index([f"k{i}" for i in range(12)], tokenizer, "semantic",
                                  embeddings=np.random.default_rng(0).normal(size=(12, 4)), num_clusters=2,
                                  max_leaf_size=4)
        ids_for_new_images(index, tokenizer, 1)
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


def test_a_removed_image_never_appears_in_any_result_and_the_index_shrinks(checkpoint):
    index = load_dsi_model(checkpoint).image_index
    gone = list(index.keys)[::3]
    size = os.path.getsize(os.path.join(checkpoint, "image_index.json"))
    remove_images(checkpoint, gone, overwrite_output_dir=True)
    model = load_dsi_model(checkpoint)
    assert len(model.image_index) == len(index) - len(gone)
    assert os.path.getsize(os.path.join(checkpoint, "image_index.json")) < size
    assert not set(gone) & set(model.image_index.keys)
    every = len(model.image_index)
    generative = DSIRetriever.from_pretrained(checkpoint, device="cpu", rerank=False)
    reranked = DSIRetriever.from_pretrained(checkpoint, device="cpu", rerank=True)
    dense = DSIRetriever.from_pretrained(os.path.join(checkpoint, "dual_encoder"), device="cpu")
    for retriever in (generative, reranked, dense):
        assert not queries(retriever, every) & set(gone)
    # the removed ids cannot be decoded: the trie has none of their token rows
    removed_rows = [index.token_ids[index.position_of_key[k]] for k in gone]
    rows = np.asarray([row + [index.eos_token_id] for row in removed_rows if len(row) == len(removed_rows[0])])
    assert (model.image_index.decode(np.concatenate([np.zeros((len(rows), 1), int), rows], 1)) == -1).all()


def test_ten_add_and_remove_rounds_never_give_one_id_to_two_images(checkpoint, trained):
    from vit_t5_dsi import ViTT5DSIProcessor

    index = load_dsi_model(checkpoint).image_index
    owner = dict(zip(index.id_strings, index.keys))  # id string -> the only key that ever had it
    for round_ in range(10):
        if round_ % 2 == 0:
            add_images(checkpoint, new_pictures(trained[1][round_:], 3, f"r{round_}"), overwrite_output_dir=True,
                       evaluate=False)
        else:
            remove_images(checkpoint, [index.keys[len(index) - 1], index.keys[round_]], overwrite_output_dir=True)
        index = load_dsi_model(checkpoint).image_index  # still loadable and valid
        index.check_tokenizer(ViTT5DSIProcessor.from_pretrained(checkpoint).tokenizer)
        assert len(set(index.id_strings)) == len(index) and index.trie is not None
        for key, id_string in zip(index.keys, index.id_strings):
            assert owner.setdefault(id_string, key) == key, f"round {round_}: {id_string} given to two images"
    updates = json.load(open(os.path.join(checkpoint, "index_updates.json")))
    assert [u["action"] for u in updates] == ["add", "remove"] * 5


def test_the_short_update_trains_on_pseudo_queries_and_replay_never_on_new_captions(checkpoint, trained, tmp_path,
                                                                                      monkeypatch):
    folder = tmp_path / "new"
    folder.mkdir()
    for key, picture in new_pictures(trained[1], 3, "fresh").items():
        picture.save(folder / f"{key}.png")
    # a Karpathy file whose captions must never train
    secret = "a secret caption that only evaluates"
    json.dump({"images": [{"filename": f"{k}.png", "split": "train", "sentences": [{"raw": f"{secret} {k}"}]}
                          for k in ("fresh_0", "fresh_1", "fresh_copy")]}, open(tmp_path / "new.json", "w"))
    seen_rows = []
    original = short_update_module.update_rows

    def spy(*args, **kwargs):
        rows = original(*args, **kwargs)
        seen_rows.extend(rows["caption"])
        return rows

    monkeypatch.setattr(short_update_module, "update_rows", spy)
    old = load_dsi_model(checkpoint).image_index
    replay = {old.keys[0]: ["a replayed training caption"]}
    record = add_images(checkpoint, str(tmp_path / "new.json"), image_dir=str(folder), output_dir=str(tmp_path / "u"),
                        update_steps=2, replay_captions=replay, batch_size=8, replay_ratio=5.0)
    assert record["update_steps"] == 2 and record["new_rows"] > 0
    assert "a replayed training caption" in seen_rows and not any(secret in c for c in seen_rows)
    stored = [json.loads(line)["caption"] for line in open(tmp_path / "u" / "pseudo_queries.jsonl")]
    assert not any(secret in c for c in stored)
    assert "new_index_hits@1" in record["figures"]
    assert load_dsi_model(str(tmp_path / "u")).image_index.positions_of(["fresh_0.png"])[0] >= 0


def test_a_crash_while_writing_leaves_the_old_checkpoint_loadable(checkpoint, trained, monkeypatch):
    before = len(load_dsi_model(checkpoint).image_index)

    def crash(self, directory, columns=None):
        raise OSError("killed while writing")

    monkeypatch.setattr(ImageIndex, "save", crash)
    with pytest.raises(OSError, match="killed"):
        add_images(checkpoint, new_pictures(trained[1], 2, "crash"), overwrite_output_dir=True, evaluate=False)
    monkeypatch.undo()
    assert len(load_dsi_model(checkpoint).image_index) == before
    assert not [n for n in os.listdir(checkpoint) if n.startswith("_saving-")]


def test_the_cli_adds_a_folder_and_removes_keys(checkpoint, trained, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for key, picture in new_pictures(trained[1], 2, "cli").items():
        picture.save(folder / f"{key}.png")
    out = str(tmp_path / "cli_out")
    update_index.main(["--model_name_or_path", checkpoint, "--add_images", str(folder), "--output_dir", out,
                       "--evaluate", "False"])
    assert {"cli_0.png", "cli_copy.png"} <= set(load_dsi_model(out).image_index.keys)
    update_index.main(["--model_name_or_path", out, "--remove_images", "cli_0.png,cli_copy.png",
                       "--overwrite_output_dir"])
    assert not {"cli_0.png", "cli_copy.png"} & set(load_dsi_model(out).image_index.keys)
    with pytest.raises(UsageError, match="not empty"):
        update_index.main(["--model_name_or_path", checkpoint, "--add_images", str(folder), "--output_dir", out])


def test_naive_and_atomic_ids_take_numbers_never_used_and_a_dual_encoder_just_embeds(checkpoint, trained, tmp_path,
                                                                                    tokenizer):
    keys = [f"k{i}" for i in range(12)]
    for scheme in ("naive", "atomic"):
        index = build_image_index(keys, tokenizer, scheme).without(["k11", "k3"])
        strings, rows, _ = ids_for_new_images(index, tokenizer, 2)
        assert strings == (["12", "13"] if scheme == "naive" else ["<img_12>", "<img_13>"])
        grown = index.extended(["n0", "n1"], strings, rows)
        assert len(grown) == 12 and grown.retired["id_strings"] == index.retired["id_strings"]
    dense = os.path.join(checkpoint, "dual_encoder")
    size = len(load_dsi_model(dense).image_index)
    add_images(dense, new_pictures(trained[1], 2, "dense"), output_dir=str(tmp_path / "dense"))
    model = load_dsi_model(str(tmp_path / "dense"))
    assert len(model.image_index) == size + 2 and len(model.image_index.embeddings) == size + 2
    found = DSIRetriever.from_pretrained(str(tmp_path / "dense"), device="cpu").retrieve(["a red circle"],
                                                                                       top_k=size + 2)
    assert {"dense_0", "dense_copy"} <= {key for key, _ in found[0]}
