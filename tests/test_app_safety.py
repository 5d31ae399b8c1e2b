"""The app and the pipeline under hostile input, concurrent users and requests for files they must not serve."""

import io
import json
import os
import shutil
import struct
import threading
import zlib

import pytest
from PIL import Image

import run_dsi_image
from app_browser import RunningApp
from conftest import tiny_args

QUERY = "a large red circle in the top left"
QUERIES = [QUERY, "a small blue square", "a green triangle at the bottom right", "a yellow star", "purple cross"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny trained checkpoint (40 demo scenes) in a folder of its own, beside its images."""
    tmp = tmp_path_factory.mktemp("app_safety")
    run_dsi_image.main(tiny_args(tmp, images=40, epochs=1))
    return str(tmp / "out")


def index_of(checkpoint):
    with open(os.path.join(checkpoint, "image_index.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def page(checkpoint):
    from vit_t5_dsi.search.app import SearchPage, load_search_pipeline

    return SearchPage(load_search_pipeline(checkpoint, "cpu"))


# ----- hostile files -------------------------------------------------------------------------------------------
def png_bomb(path, side=20_000):
    """A real PNG of side x side grey pixels (400 M for 20,000), all zero: ~400 KB on disk."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    packer, row = zlib.compressobj(9), b"\0" * (side + 1)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def hostile_files(folder, source: Image.Image):
    """name -> (path, what the page must say)."""
    folder.mkdir(exist_ok=True)
    empty = folder / "empty.png"
    empty.write_bytes(b"")
    jpeg = io.BytesIO()
    source.save(jpeg, format="JPEG")
    truncated = folder / "truncated.jpg"
    truncated.write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    not_image = folder / "notes.png"
    not_image.write_text("this is a text file with an image's name\n" * 20)
    return {"0-byte upload": (empty, "empty (0 bytes)"),
            "truncated JPEG": (truncated, "truncated or corrupt"),
            "20,000 x 20,000 PNG": (png_bomb(folder / "bomb.png"), "decompression bombs"),
            "non-image renamed .png": (not_image, "not an image Pillow can read")}


def odd_images(folder, source: Image.Image):
    """name -> (path, the upright RGB image it holds): CMYK, 16-bit grey, palette with transparency, EXIF-rotated."""
    folder.mkdir(exist_ok=True)
    made = {}
    cmyk = folder / "cmyk.jpg"
    source.convert("CMYK").save(cmyk, quality=95)
    made["CMYK"] = (cmyk, None)
    grey16 = folder / "grey16.png"
    Image.frombytes("I;16", source.size, bytes(b for v in source.convert("L").tobytes() for b in (0, v))).save(grey16)
    made["16-bit"] = (grey16, source.convert("L").convert("RGB"))
    palette = folder / "palette.png"
    source.convert("P").save(palette, transparency=0)
    made["palette"] = (palette, None)
    rotated = folder / "rotated.png"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned 90 degrees counter-clockwise: viewers turn it back
    source.transpose(Image.Transpose.ROTATE_90).save(rotated, exif=exif)
    made["EXIF-rotated"] = (rotated, source)
    return made


def test_hostile_text_gets_a_message_and_clean_text_is_searched(page):
    gallery, message = page("x" * 100_000, None, 3)
    assert gallery == [] and "100,000 characters" in message
    plain, _ = page(QUERY, None, 3)
    hostile = "\u202e" + QUERY.replace(" ", "\x00 ", 2) + "\x07\u2066"
    gallery, message = page(hostile, None, 3)
    assert [caption for _, caption in gallery] == [caption for _, caption in plain]
    assert "Removed 5 control or text-direction characters" in message
    gallery, message = page("\u05e2\u05d9\u05d2\u05d5\u05dc \u05d0\u05d3\u05d5\u05dd", None, 3)  # Hebrew
    assert len(gallery) == 3 and "vocabulary" in message
    gallery, message = page("\x00\x07\u202e", None, 3)
    assert gallery == [] and "Type a caption" in message


def test_the_pipeline_reads_any_text_safely(checkpoint):
    from vit_t5_dsi.search.app import load_search_pipeline

    search = load_search_pipeline(checkpoint, "cpu")
    expected = [hit["image_key"] for hit in search(QUERY, top_k=3)]
    assert [hit["image_key"] for hit in search("\u202e" + QUERY + "\x00", top_k=3)] == expected
    assert len(search(QUERY + " red" * 25_000, top_k=3)) == 3  # 100,000 characters: the first 64 tokens
    with pytest.raises(ValueError, match="empty query"):
        search("\x00\u202e\x1b")


def test_hostile_uploads_get_a_message(page, checkpoint, tmp_path):
    index = index_of(checkpoint)
    source = Image.open(os.path.join(index["image_root"], index["image_files"][0])).convert("RGB")
    for name, (path, says) in hostile_files(tmp_path, source).items():
        gallery, message = page(None, str(path), 3)
        assert gallery == [] and says in message, (name, message)
        gallery, message = page(None, {"path": str(path), "orig_name": path.name}, 3)
        assert gallery == [] and says in message and path.name in message, (name, message)


def test_odd_image_modes_and_exif_rotation_are_read_upright(page, checkpoint, tmp_path):
    from vit_t5_dsi.search.app_safety import read_upload

    index = index_of(checkpoint)
    source = Image.open(os.path.join(index["image_root"], index["image_files"][0])).convert("RGB")
    for name, (path, upright) in odd_images(tmp_path, source).items():
        image = read_upload(str(path))
        assert image.mode == "RGB" and image.size == source.size, name
        if upright is not None:
            assert image.tobytes() == upright.tobytes(), name
        gallery, message = page(None, str(path), 3)
        assert len(gallery) == 3 and "image query" in message, (name, message)
    # the rotated file finds what the upright image finds, in the app and in the pipeline
    rotated = str(tmp_path / "rotated.png")
    assert page(None, rotated, 3)[0] == page(None, source, 3)[0]
    keys = [hit["image_key"] for hit in page.search(source, top_k=3)]
    assert [hit["image_key"] for hit in page.search(Image.open(rotated), top_k=3)] == keys


# ----- files outside the collection ---------------------------------------------------------------------------
def test_an_index_never_names_a_file_outside_its_image_folder(checkpoint, tmp_path):
    from vit_t5_dsi import ImageIndex

    index = ImageIndex.from_pretrained(checkpoint)
    outside = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(outside)
    folder = tmp_path / "images"
    shutil.copytree(index.image_root, folder)
    os.symlink(outside, folder / "link.png")
    # an index (say from the Hub) whose image_files leave image_dir every way there is
    data = index_of(checkpoint)
    data["image_files"][:4] = ["../secret.png", str(outside), "link.png", "sub/../../secret.png"]
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    (hostile / "image_index.json").write_text(json.dumps(data))
    loaded = ImageIndex.from_pretrained(str(hostile))
    assert [loaded.image_path(i, str(folder)) for i in range(4)] == [None] * 4
    assert os.path.isfile(loaded.image_path(4, str(folder)))


@pytest.fixture(scope="module")
def running_app(checkpoint, tmp_path_factory):
    """The app on the checkpoint, with a symlink in its image folder that points at the checkpoint's weights."""
    pytest.importorskip("gradio", reason="the app extra: pip install -e '.[app]'")
    root = index_of(checkpoint)["image_root"]
    link = os.path.join(root, "weights.png")
    os.symlink(os.path.join(checkpoint, "model.safetensors"), link)
    try:
        with RunningApp(checkpoint) as app:
            yield app
    finally:
        os.unlink(link)


def test_the_running_app_serves_only_the_collections_images(running_app, checkpoint):
    import httpx

    index = index_of(checkpoint)
    root = index["image_root"]
    image = os.path.join(root, index["image_files"][0])

    def get(path):
        return httpx.get(f"{running_app.url.rstrip('/')}/gradio_api/file={path}", timeout=30).status_code

    assert get(image) == 200  # the collection is served
    refused = {
        "/etc/passwd": "/etc/passwd",
        "the checkpoint's weights": os.path.join(checkpoint, "model.safetensors"),
        "the checkpoint's index": os.path.join(checkpoint, "image_index.json"),
        "../ out of the image folder": os.path.join(root, "..", "..", "out", "model.safetensors"),
        "encoded ../": root + "/%2E%2E/%2E%2E/out/config.json",
        "a symlink in the image folder": os.path.join(root, "weights.png"),
        "this source file": os.path.abspath(__file__),
    }
    for name, path in refused.items():
        assert get(path) in (403, 404), name
    deprecated = httpx.get(f"{running_app.url.rstrip('/')}/gradio_api/file/etc/passwd", timeout=30)
    assert deprecated.status_code in (403, 404)


def test_the_running_app_answers_hostile_input_with_messages_and_stays_up(running_app, checkpoint, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(running_app.url, verbose=False)
    _, message = client.predict("y" * 100_000, None, 3, api_name="/search")
    assert "100,000 characters" in message
    _, message = client.predict("\u202e" + QUERY + "\x00", None, 3, api_name="/search")
    assert "Removed 2 control" in message
    index = index_of(checkpoint)
    source = Image.open(os.path.join(index["image_root"], index["image_files"][0])).convert("RGB")
    for name, (path, says) in hostile_files(tmp_path, source).items():
        gallery, message = client.predict("", handle_file(str(path)), 3, api_name="/search")
        assert not gallery and says in message, (name, message)
    for name, (path, _) in odd_images(tmp_path / "odd", source).items():
        gallery, message = client.predict("", handle_file(str(path)), 3, api_name="/search")
        assert len(gallery) == 3 and "image query" in message, (name, message)
    gallery, message = client.predict(QUERY, None, 4, api_name="/search")  # still up, still right
    assert len(gallery) == 4 and message.startswith("Top 4 of 40")
    assert running_app.process.poll() is None


def test_concurrent_clients_get_what_one_client_gets(running_app):
    """4 clients x 10 queries at once through Gradio's queue: no errors, the answers of one-at-a-time queries."""
    from gradio_client import Client

    def keys(client, query):
        gallery, _ = client.predict(query, None, 5, api_name="/search")
        return [item["caption"] for item in gallery]

    sequential = {query: keys(Client(running_app.url, verbose=False), query) for query in QUERIES}
    answers, errors = [], []

    def user(number):
        client = Client(running_app.url, verbose=False)
        for i in range(10):
            query = QUERIES[(number + i) % len(QUERIES)]
            try:
                answers.append((query, keys(client, query)))
            except Exception as err:  # noqa: BLE001 - counted below
                errors.append(repr(err))

    threads = [threading.Thread(target=user, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert errors == [] and len(answers) == 40
    assert all(found == sequential[query] for query, found in answers)
