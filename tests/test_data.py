import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_images
from PIL import Image

from vit_t5_dsi.identifiers.build import build_image_index
from vit_t5_dsi.data.collection import CollectionError, check_images, load_hub_parquet, load_jsonl, load_karpathy
from vit_t5_dsi.data.splits import build_dsi_splits
from vit_t5_dsi.checkpoint.processing_vit_t5_dsi import load_rgb, to_rgb
from vit_t5_dsi.data.synthetic_scenes import generate_scenes, sample_scenes


def karpathy(tmp_path, entries, images=True):
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    if images:
        write_images(tmp_path / "images", [e["filename"] for e in entries])
    return str(path), str(tmp_path / "images")


def entry(name, split="train", captions=("a dog runs", "a brown dog", "dog on grass")):
    return {"filename": name, "split": split, "sentences": [{"raw": c, "tokens": c.split()} for c in captions]}


# ----- loaders ---------------------------------------------------------------------------------------

def test_karpathy_loader(tmp_path):
    path, image_dir = karpathy(tmp_path, [entry("1.jpg"), entry("2.jpg", "test"), entry("3.jpg", "val")])
    collection = load_karpathy(path, image_dir)
    assert collection.images["image_key"] == ["1.jpg", "2.jpg", "3.jpg"]
    assert collection.images["split"] == ["train", "test", "val"]
    assert len(collection.captions) == 9
    assert load_rgb(collection.images[0]["image"]).size == (16, 16)


def test_hub_parquet_loader(tmp_path):
    import io

    def png(color):
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
        return buffer.getvalue()

    table = pa.table({
        "image": [{"bytes": png((255, 0, 0)), "path": "a.jpg"}, {"bytes": png((0, 0, 255)), "path": "b.jpg"}],
        "caption": [["a red square", "red"], ["a blue square"]],
        "split": ["train", "test"], "img_id": ["0", "1"], "filename": ["a.jpg", "b.jpg"]})
    (tmp_path / "data").mkdir()
    pq.write_table(table, tmp_path / "data" / "test-00000-of-00001.parquet")
    collection = load_hub_parquet(str(tmp_path))
    assert collection.images["image_key"] == ["a.jpg", "b.jpg"]
    assert collection.captions["caption"] == ["a red square", "red", "a blue square"]
    assert load_rgb(collection.images[1]["image"]).getpixel((0, 0)) == (0, 0, 255)
    check_images(collection, progress=False)


def test_jsonl_loader(tmp_path):
    write_images(tmp_path, ["x.png", "y.png", "z.png"])
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps(r) for r in [
        {"image_id": "x", "image": "x.png"}, {"image_id": "y", "image": "y.png"}, {"image_id": "z", "image": "z.png"},
        {"image_id": "x", "caption": "first"}, {"image_id": "y", "caption": "second"}]))
    validation = tmp_path / "validation.jsonl"
    validation.write_text(json.dumps({"image_id": "z", "caption": "third"}))
    collection = load_jsonl(str(train), str(validation))
    assert collection.images["split"] == ["train", "train", "test"]
    splits = build_dsi_splits(collection)
    assert splits.eval_queries["caption"] == ["third"] and len(splits.index) == 3


def test_validation_captions_never_become_training_captions(tmp_path):
    """An image with captions in both files stays a training image; its validation captions are 'seen' queries."""
    write_images(tmp_path, ["x.png", "y.png", "z.png"])
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps(r) for r in [
        {"image_id": "x", "image": "x.png"}, {"image_id": "y", "image": "y.png"}, {"image_id": "z", "image": "z.png"},
        {"image_id": "x", "caption": "x trained"}, {"image_id": "y", "caption": "y trained"},
        {"image_id": "y", "caption": "y trained again"}]))
    validation = tmp_path / "validation.jsonl"
    validation.write_text("\n".join(json.dumps(r) for r in [
        {"image_id": "x", "caption": "x validation"}, {"image_id": "z", "caption": "z validation"}]))
    splits = build_dsi_splits(load_jsonl(str(train), str(validation)), seen_captions_per_image=0)
    assert set(splits.train_queries["caption"]) == {"x trained", "y trained", "y trained again"}
    assert splits.seen_queries["caption"] == ["x validation"]
    assert splits.eval_queries["caption"] == ["z validation"]
    evaluation = set(splits.seen_queries["caption"]) | set(splits.eval_queries["caption"])
    assert not evaluation & set(splits.train_queries["caption"])


@pytest.mark.parametrize("image", ["/etc/passwd", "../outside.png", "sub/../../outside.png"])
def test_image_paths_that_leave_the_image_directory_are_refused(tmp_path, image):
    rows = tmp_path / "train.jsonl"
    rows.write_text(json.dumps({"image_id": "fine", "image": "fine.png"}) + "\n" +
                    json.dumps({"image_id": "a", "image": image}) + "\n")
    with pytest.raises(CollectionError, match=r"train.jsonl:2: image path .* leaves the image directory"):
        load_jsonl(str(rows))
    path, image_dir = karpathy(tmp_path, [entry("ok.jpg")])
    data = json.loads(open(path).read())
    data["images"].append({**entry("x.jpg"), "filename": image})
    open(path, "w").write(json.dumps(data))
    with pytest.raises(CollectionError, match=r"images\[1\]\).* leaves the image directory"):
        load_karpathy(path, image_dir)


# ----- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("entries, message", [
    ([entry("1.jpg"), entry("1.jpg")], "duplicate image key '1.jpg'"),
    ([entry("1.jpg", captions=("fine", "  "))], r"image '1.jpg' \(images\[0\]\) caption #1 is empty"),
    ([entry("1.jpg", captions=())], r"image '1.jpg' \(images\[0\]\) has no captions"),
    ([entry("1.jpg", split="holdout")], "unknown split 'holdout'"),
])
def test_karpathy_bad_input_names_item_and_file(tmp_path, entries, message):
    path, image_dir = karpathy(tmp_path, entries)
    with pytest.raises(CollectionError, match=message) as err:
        load_karpathy(path, image_dir)
    assert "dataset_flickr30k.json" in str(err.value)


def test_karpathy_without_images_list(tmp_path):
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"annotations": []}))
    with pytest.raises(CollectionError, match="dataset_coco.json: no 'images' list"):
        load_karpathy(str(path), str(tmp_path))


def test_missing_and_truncated_images_stop_or_are_skipped(tmp_path, caplog):
    path, image_dir = karpathy(tmp_path, [entry("ok.png"), entry("gone.png"), entry("cut.png", "test")])
    os.remove(os.path.join(image_dir, "gone.png"))
    Image.new("RGB", (64, 64), (1, 2, 3)).save(os.path.join(image_dir, "cut.png"))
    data = open(os.path.join(image_dir, "cut.png"), "rb").read()
    open(os.path.join(image_dir, "cut.png"), "wb").write(data[: len(data) // 2])
    collection = load_karpathy(path, image_dir)
    with pytest.raises(CollectionError, match=r"missing image file: image 'gone.png' .*gone.png.*dataset_flickr30k"):
        check_images(collection, progress=False)
    with caplog.at_level("WARNING"):
        kept = check_images(collection, skip_bad_images=True, progress=False)
    assert kept.images["image_key"] == ["ok.png"]
    assert set(kept.captions["image_key"]) == {"ok.png"}
    assert "left out 2 of 3 images (cut.png, gone.png)" in caplog.text
    assert "truncated" in caplog.text


def test_jsonl_bad_rows(tmp_path):
    bad = tmp_path / "train.jsonl"
    bad.write_text(json.dumps({"image_id": "q", "caption": "orphan"}))
    with pytest.raises(CollectionError, match="train.jsonl:1: caption refers to image 'q'"):
        load_jsonl(str(bad))
    bad.write_text('{"image_id": "a", "image": "a.png"}\n{"oops": 1}\n')
    with pytest.raises(CollectionError, match="train.jsonl:2: row has no 'image_id'"):
        load_jsonl(str(bad))


# ----- the protocol ----------------------------------------------------------------------------------

def fake_collection(tmp_path, num_train, num_test, num_val, captions=5):
    names = [f"{i}.jpg" for i in range(num_train + num_test + num_val)]
    splits = ["train"] * num_train + ["test"] * num_test + ["val"] * num_val
    entries = [entry(n, s, tuple(f"caption {j} of {n}" for j in range(captions))) for n, s in zip(names, splits)]
    path, image_dir = karpathy(tmp_path, entries, images=False)
    return load_karpathy(path, image_dir)


def test_original_flickr30k_protocol_counts(tmp_path):
    collection = fake_collection(tmp_path, 29000, 1000, 1014)  # Flickr30K's Karpathy split sizes
    splits = build_dsi_splits(collection, num_index_images=10000, num_eval_images=2000, seed=7)
    assert len(splits.index) == 10000
    assert len(set(splits.eval_queries["image_key"])) == 2000
    assert len(set(splits.train_queries["image_key"])) == 8000
    assert not set(splits.eval_queries["image_key"]) & set(splits.train_queries["image_key"])
    assert len(splits.eval_queries) == 10000 and len(splits.train_queries) == 40000
    again = build_dsi_splits(collection, num_index_images=10000, num_eval_images=2000, seed=7)
    assert again.index["image_key"] == splits.index["image_key"]
    other = build_dsi_splits(collection, num_index_images=10000, num_eval_images=2000, seed=8)
    assert other.index["image_key"] != splits.index["image_key"]


def test_seen_protocol_holds_out_captions_of_training_images(tmp_path):
    collection = fake_collection(tmp_path, 20, 5, 0, captions=3)
    splits = build_dsi_splits(collection, seen_captions_per_image=1)
    assert len(splits.seen_queries) == 20 and len(splits.train_queries) == 40
    assert set(splits.seen_queries["image_key"]) == set(splits.train_queries["image_key"])
    assert not set(splits.seen_queries["caption"]) & set(splits.train_queries["caption"])
    assert len(splits.eval_queries) == 15


def test_protocol_errors(tmp_path):
    collection = fake_collection(tmp_path, 10, 2, 0)
    with pytest.raises(CollectionError, match="num_eval_images=5"):
        build_dsi_splits(collection, num_eval_images=5)
    with pytest.raises(CollectionError, match="num_index_images=50"):
        build_dsi_splits(collection, num_index_images=50)


# ----- synthetic scenes ------------------------------------------------------------------------------

def test_synthetic_scenes_deterministic_unique_and_loadable(tmp_path):
    a = generate_scenes(str(tmp_path / "a"), 120, image_size=32, seed=3, progress=False)
    b = generate_scenes(str(tmp_path / "b"), 120, image_size=32, seed=3, progress=False)
    assert open(a).read() == open(b).read()
    assert open(tmp_path / "a/images/scene_000007.png", "rb").read() == \
        open(tmp_path / "b/images/scene_000007.png", "rb").read()
    scenes = sample_scenes(5000, seed=1)
    assert len(set(scenes)) == 5000
    collection = load_karpathy(a, str(tmp_path / "a/images"))
    check_images(collection, progress=False)
    for image_captions in np.array(collection.captions["caption"]).reshape(120, 3):
        assert len(set(image_captions)) == 3  # three different wordings
    assert set(collection.images["split"]) == {"train", "test", "val"}


def test_synthetic_scenes_size_bounds():
    with pytest.raises(ValueError, match="num_images"):
        sample_scenes(600, max_objects=1)  # only 576 distinct single-object scenes exist


# ----- image conversion ------------------------------------------------------------------------------

def test_rgba_composited_on_white():
    image = Image.new("RGBA", (2, 2), (255, 0, 0, 0))  # fully transparent red
    image.putpixel((1, 1), (0, 0, 255, 128))  # half-transparent blue
    rgb = to_rgb(image)
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    r, g, b = rgb.getpixel((1, 1))
    assert abs(r - 127) <= 1 and abs(g - 127) <= 1 and b == 255


@pytest.mark.parametrize("mode", ["P", "L", "CMYK", "LA", "I;16"])
def test_every_mode_becomes_rgb(mode):
    image = Image.new("RGB", (4, 4), (10, 200, 30)).convert(mode) if mode != "I;16" else Image.new("I;16", (4, 4), 40000)
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (4, 4)
    if mode == "I;16":
        assert rgb.getpixel((0, 0))[0] == 40000 // 256


def test_palette_with_transparency_uses_white(tmp_path):
    image = Image.new("P", (2, 2), 0)
    image.putpalette([0, 0, 0] * 256)
    image.info["transparency"] = 0
    image.save(tmp_path / "p.png")
    assert load_rgb(str(tmp_path / "p.png")).getpixel((0, 0)) == (255, 255, 255)


def test_processor_output_shape(tokenizer):
    from conftest import tiny_config
    from vit_t5_dsi import ViTT5DSIProcessor

    processor = ViTT5DSIProcessor.for_model(tiny_config(), tokenizer, max_caption_length=4)
    batch = processor(images=[Image.new("RGBA", (50, 40)), Image.new("L", (64, 64))],
                      text=["a large red circle in the top left", "a square"])
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert batch["input_ids"].shape == (2, 4)  # truncated to max_caption_length


def test_collator_augments_training_rows_only(tmp_path, tokenizer):
    import torch

    from conftest import tiny_config
    from vit_t5_dsi import ViTT5DSIProcessor
    from vit_t5_dsi.data.rows import DSICollator, ImageSource, evaluation_sets, training_stream
    from vit_t5_dsi.checkpoint.image_index import ImageIndex

    path = generate_scenes(str(tmp_path), 20, image_size=32, seed=0, progress=False)
    splits = build_dsi_splits(load_karpathy(path, str(tmp_path / "images")), seen_captions_per_image=1)
    keys = splits.index["image_key"][:]
    index = build_image_index(keys, tokenizer, "naive")
    processor = ViTT5DSIProcessor.for_model(tiny_config(), tokenizer)
    collator = DSICollator(index, ImageSource(splits.index), processor, "cross_attention", augment=True)
    train_rows = [{**row, "evaluate": False} for row in (evaluation_sets(splits)["index"][i] for i in range(4))]
    torch.manual_seed(0)
    first_train = collator(train_rows)["pixel_values"]
    torch.manual_seed(1)  # crops are seeded by (seed, epoch, row), never by the global RNG: a resumed run's are equal
    assert torch.equal(first_train, collator(train_rows)["pixel_values"])
    collator.epoch = 1
    assert not torch.equal(first_train, collator(train_rows)["pixel_values"])  # training rows are augmented
    eval_rows = [evaluation_sets(splits)["index"][i] for i in range(4)]
    torch.manual_seed(0)
    first = collator(eval_rows)["pixel_values"]
    torch.manual_seed(1)
    assert torch.equal(first, collator(eval_rows)["pixel_values"])  # evaluation is never augmented
    stream = training_stream(splits, "cross_attention")
    batch = collator([stream[i] for i in range(8)])
    assert "pixel_values" in batch and "input_ids" in batch
    num_images = len(batch["pixel_values"])
    assert batch["labels"].shape[0] == num_images + len(batch["input_ids"])
    # images first: their labels are those of the image rows, in order
    rows = [stream[i] for i in range(8)]
    image_keys = [r["image_key"] for r in rows if r["kind"] == 0]
    assert batch["labels"][0, : len(index.labels_for(image_keys[0]))].tolist() == index.labels_for(image_keys[0])


def test_inspect_collection_script_reports_bad_input(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("inspect_collection", os.path.join(
        os.path.dirname(__file__), "..", "data_scripts", "inspect_collection.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path, image_dir = karpathy(tmp_path, [entry("1.jpg"), entry("2.jpg", "test")])
    assert module.main(["--karpathy_json", path, "--image_dir", image_dir]) == 0
    assert "2 images indexed, 2 training captions, 3 held-out-image queries, 1 seen-image queries" in capsys.readouterr().out
    os.remove(os.path.join(image_dir, "2.jpg"))
    assert module.main(["--karpathy_json", path, "--image_dir", image_dir]) == 1
    assert "missing image file: image '2.jpg'" in capsys.readouterr().err


# ----- decoded images kept as uint8 -----------------------------------------------------------------------

@pytest.fixture
def scene_source(tmp_path, tokenizer):
    from conftest import tiny_config
    from vit_t5_dsi import ViTT5DSIProcessor
    from vit_t5_dsi.data.rows import ImageSource

    path = generate_scenes(str(tmp_path), 12, image_size=64, seed=0, progress=False)
    collection = load_karpathy(path, str(tmp_path / "images"))
    return ImageSource(collection.images), ViTT5DSIProcessor.for_model(tiny_config(), tokenizer)


def test_cached_images_give_exactly_the_pixels_of_a_full_pass_and_are_decoded_once(scene_source):
    import torch

    from vit_t5_dsi.data.image_cache import DecodedImages

    images, processor = scene_source
    keys = list(images.position)[:8]
    cache = DecodedImages(images, processor, budget_mb=64)
    full = processor(images=[images.load(key) for key in keys])["pixel_values"]
    assert torch.equal(cache.pixel_values(keys), full)
    assert cache.enabled and cache.used == 8 * 3 * 32 * 32  # uint8: one byte per value
    decoded = cache.decoded
    assert torch.equal(cache.pixel_values(keys[::-1]), full.flip(0))  # later epochs decode nothing
    assert cache.decoded == decoded


def test_a_changed_image_file_is_decoded_again(scene_source):
    import time

    import torch

    from vit_t5_dsi.data.image_cache import DecodedImages

    images, processor = scene_source
    key = next(iter(images.position))
    cache = DecodedImages(images, processor)
    before = cache.pixel_values([key])
    time.sleep(0.01)
    Image.new("RGB", (64, 64), (250, 0, 0)).save(images.path(key))  # the file changes under the running job
    after = cache.pixel_values([key])
    assert not torch.equal(before, after)
    assert torch.equal(after, processor(images=[Image.new("RGB", (64, 64), (250, 0, 0))])["pixel_values"])


def test_cache_budget_and_switching_it_off(scene_source):
    import torch

    from vit_t5_dsi.data.image_cache import DecodedImages

    images, processor = scene_source
    keys = list(images.position)[:6]
    small = DecodedImages(images, processor, budget_mb=2 * 3 * 32 * 32 / 2 ** 20)  # room for two images
    full = processor(images=[images.load(key) for key in keys])["pixel_values"]
    assert torch.equal(small.pixel_values(keys), full) and small.used == 2 * 3 * 32 * 32
    off = DecodedImages(images, processor, budget_mb=0)
    assert torch.equal(off.pixel_values(keys), full) and off.used == 0
    off.pixel_values(keys)
    assert off.decoded == 12  # every call decodes


def test_augmentation_acts_on_the_cached_image(scene_source):
    import torch
    from torchvision.transforms import RandomResizedCrop

    from vit_t5_dsi.data.image_cache import DecodedImages

    images, processor = scene_source
    keys = list(images.position)[:4]
    cache = DecodedImages(images, processor)
    plain = cache.pixel_values(keys)
    crop = RandomResizedCrop((32, 32), scale=(0.5, 0.6))
    torch.manual_seed(0)
    augmented = cache.pixel_values(keys, crop)
    assert augmented.shape == plain.shape and not torch.equal(augmented, plain)
    assert torch.equal(cache.pixel_values(keys), plain)  # the cached image itself is never altered


def test_the_caption_tokenizer_gives_the_same_ids_in_every_process():
    """The `tokenizers` BPE trainer breaks ties in hash-map order, which changes per process and per call; ours
    (`learn_bpe`) does not: the whole tokenizer, and so how words the captions never use split, is the same."""
    import subprocess
    import sys

    script = (
        "import json, sys\n"
        "from vit_t5_dsi.data.caption_tokenizer import train_caption_tokenizer\n"
        "colours = ['red', 'green', 'blue', 'yellow', 'black', 'white', 'orange', 'purple']\n"
        "shapes = ['circle', 'square', 'triangle', 'diamond']\n"
        "places = ['in the top left', 'at the bottom right', 'in the center', 'on the middle left']\n"
        "captions = [f'a {s} {c} {h} {p}' for s in ('small', 'large') for c in colours for h in shapes for p in places]\n"
        "t = train_caption_tokenizer(captions, vocab_size=400)\n"
        "again = train_caption_tokenizer(captions, vocab_size=400)\n"
        "assert again.backend_tokenizer.to_str() == t.backend_tokenizer.to_str()\n"
        "print(json.dumps([t(captions)['input_ids'], t('0123456789')['input_ids'], t.backend_tokenizer.to_str(),\n"
        "                  t('a mauve trapezoid near the upper rim')['input_ids']]))\n")
    outputs = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
               for _ in range(3)}
    assert len(outputs) == 1
    digits = json.loads(outputs.pop())[1][:10]
    assert digits == list(range(3, 13))  # right after pad, eos, unk: naive ids are the same tokens everywhere


def _pixels_of_epoch(cache, keys, workers):
    import torch

    loader = torch.utils.data.DataLoader(keys, batch_size=3, num_workers=workers, collate_fn=cache.pixel_values,
                                         multiprocessing_context="fork" if workers else None)
    return torch.cat(list(loader))


def test_dataloader_workers_share_the_cache_and_later_epochs_decode_nothing(scene_source):
    """Trainer starts new workers every epoch: what one epoch's workers decoded, the next epoch's reuse."""
    import torch

    from vit_t5_dsi.data.image_cache import DecodedImages

    images, processor = scene_source
    keys = list(images.position)
    cache = DecodedImages(images, processor, budget_mb=64)
    first = _pixels_of_epoch(cache, keys, workers=2)
    assert torch.equal(first, processor(images=[images.load(key) for key in keys])["pixel_values"])
    assert cache.slab.filled() == len(keys) and cache.used == len(keys) * 3 * 32 * 32  # filled by the workers

    def no_decoding(key):
        raise AssertionError(f"{key} decoded again")

    images.load = no_decoding  # the next epoch's workers are forked from here
    assert torch.equal(_pixels_of_epoch(cache, keys, workers=2), first)


def test_the_shared_cache_holds_what_the_budget_allows(scene_source):
    import torch

    from vit_t5_dsi.data.image_cache import DecodedImages

    images, processor = scene_source
    keys = list(images.position)
    cache = DecodedImages(images, processor, budget_mb=5 * 3 * 32 * 32 / 2 ** 20)  # room for five images
    assert cache.slab.capacity == 5
    pixels = _pixels_of_epoch(cache, keys, workers=2)
    assert torch.equal(pixels, processor(images=[images.load(key) for key in keys])["pixel_values"])
    assert cache.slab.filled() == 5 and cache.used == 5 * 3 * 32 * 32


def test_a_process_that_cannot_share_the_block_keeps_its_own_cache(scene_source):
    """A worker started with `spawn` gets a pickled collator: the block is detached there, and the images are
    cached in that process instead."""
    import pickle

    import torch

    from vit_t5_dsi.data.image_cache import DecodedImages

    images, processor = scene_source
    keys = list(images.position)[:4]
    copy = pickle.loads(pickle.dumps(DecodedImages(images, processor, budget_mb=64)))
    assert not copy.slab.attached
    full = processor(images=[images.load(key) for key in keys])["pixel_values"]
    assert torch.equal(copy.pixel_values(keys), full)
    decoded = copy.decoded
    assert torch.equal(copy.pixel_values(keys), full) and copy.decoded == decoded
    assert copy.used == 4 * 3 * 32 * 32


def test_bpe_merges_on_a_hand_computed_case():
    """'low' x5, 'lower' x2, 'newest' x6, 'widest' x3 (Sennrich et al.'s example): the first merges are the most
    frequent pairs, ties to the pair that sorts first."""
    from vit_t5_dsi.data.bpe_merges import learn_bpe

    counts = {"low": 5, "lower": 2, "newest": 6, "widest": 3}
    vocab, merges = learn_bpe(counts, vocab_size=10 ** 6, alphabet=[], special_tokens=["<pad>"])
    # ##e ##s and ##s ##t: 9 each (newest, widest): the tie goes to ('##e', '##s'); then ('##es', '##t') (9);
    # then ##o ##w and l ##o, 7 each (low, lower): '##o' sorts before 'l'
    assert merges[:4] == [("##e", "##s"), ("##es", "##t"), ("##o", "##w"), ("l", "##ow")]
    assert vocab[:2] == ["<pad>", "d"] and "##est" in vocab and "low" in vocab
    assert set(vocab) >= set(counts)  # run to the end, every word is one token
    small, _ = learn_bpe(counts, vocab_size=len(vocab) - 3, alphabet=[], special_tokens=["<pad>"])
    assert small == vocab[:-3]
