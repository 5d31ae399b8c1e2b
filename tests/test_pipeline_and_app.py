"""The `text-to-image-retrieval` pipeline a checkpoint carries, the Gradio app on it, and the card's Hub metadata."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from PIL import Image

import run_dsi_image
from app_browser import RunningApp, browser_missing, headless_chromium, search_in_browser
from conftest import ROOT, tiny_args

TASK = "text-to-image-retrieval"
QUERY = "a large red circle in the top left"
SCHEMES = {"cross_attention": "semantic", "codebook": "naive", "dual_encoder": "naive"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One tiny trained checkpoint per variant (40 demo scenes, 2 epochs)."""
    made = {}
    for variant, scheme in SCHEMES.items():
        tmp = tmp_path_factory.mktemp(variant)
        run_dsi_image.main(tiny_args(tmp, "--variant", variant, "--docid_scheme", scheme, images=40, epochs=2))
        made[variant] = str(tmp / "out")
    return made


def remote_pipeline(checkpoint, **kwargs):
    from transformers import pipeline

    return pipeline(TASK, model=checkpoint, trust_remote_code=True, device="cpu", **kwargs)


def index_of(checkpoint):
    return json.loads(open(os.path.join(checkpoint, "image_index.json")).read())


def check_hits(hits, checkpoint, k):
    index = index_of(checkpoint)
    keys = [hit["image_key"] for hit in hits]
    assert len(hits) == k and len(set(keys)) == k and set(keys) <= set(index["keys"])
    scores = [hit["score"] for hit in hits]
    assert scores == sorted(scores, reverse=True)
    for hit in hits:
        assert set(hit) == {"image_key", "score", "path"}
        assert os.path.isfile(hit["path"]) and os.path.basename(hit["path"]) == hit["image_key"]


@pytest.mark.parametrize("variant", list(SCHEMES))
def test_the_checkpoint_carries_a_pipeline_that_matches_the_retriever(checkpoints, variant):
    from vit_t5_dsi import DSIRetriever

    checkpoint = checkpoints[variant]
    config = json.loads(open(os.path.join(checkpoint, "config.json")).read())
    assert TASK in config["custom_pipelines"]
    assert os.path.isfile(os.path.join(checkpoint, "pipeline_text_to_image_retrieval.py"))
    search = remote_pipeline(checkpoint)
    hits = search(QUERY, top_k=4)
    check_hits(hits, checkpoint, 4)
    expected = DSIRetriever.from_pretrained(checkpoint, device="cpu").retrieve([QUERY], top_k=4)[0]
    assert [hit["image_key"] for hit in hits] == [key for key, _ in expected]
    assert [hit["score"] for hit in hits] == pytest.approx([score for _, score in expected], abs=1e-4)


@pytest.mark.parametrize("variant", list(SCHEMES))
def test_a_list_of_queries_batched_gives_what_each_query_gives_alone(checkpoints, variant):
    search = remote_pipeline(checkpoints[variant])
    queries = [QUERY, "a small blue square", "a green triangle at the bottom right"]
    batched = search(queries, top_k=3, batch_size=2)
    assert len(batched) == 3
    for query, hits in zip(queries, batched):
        alone = search(query, top_k=3)
        assert [h["image_key"] for h in hits] == [h["image_key"] for h in alone]
        assert [h["score"] for h in hits] == pytest.approx([h["score"] for h in alone], abs=1e-4)


@pytest.mark.parametrize("variant", list(SCHEMES))
def test_an_image_query_returns_indexed_images(checkpoints, variant):
    checkpoint = checkpoints[variant]
    index = index_of(checkpoint)
    query_image = Image.open(os.path.join(index["image_root"], index["image_files"][0]))
    hits = remote_pipeline(checkpoint)(query_image, top_k=3, return_images=True)
    assert len(hits) == 3 and len({h["image_key"] for h in hits}) == 3
    for hit in hits:
        assert isinstance(hit["image"], Image.Image) and hit["image"].size == query_image.size


def test_a_moved_collection_is_found_with_image_dir(checkpoints, tmp_path):
    checkpoint = checkpoints["cross_attention"]
    index = index_of(checkpoint)
    moved = tmp_path / "moved"
    shutil.copytree(index["image_root"], moved)
    search = remote_pipeline(checkpoint)
    hits = search(QUERY, top_k=2, image_dir=str(moved))
    assert all(hit["path"] == str(moved / hit["image_key"]) for hit in hits)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert [hit["path"] for hit in search(QUERY, top_k=2, image_dir=str(empty))] == [None, None]
    assert [hit["image"] for hit in search(QUERY, top_k=2, image_dir=str(empty), return_images=True)] == [None] * 2


def test_dense_reranking_in_the_pipeline_matches_the_retriever(checkpoints):
    from vit_t5_dsi import DSIRetriever

    generative, dense = checkpoints["cross_attention"], checkpoints["dual_encoder"]  # same 40 scenes, same keys
    search = remote_pipeline(generative, rerank_with=dense, rerank_weight=0.7)
    queries = [QUERY, "a small blue square"]
    expected = DSIRetriever.from_pretrained(generative, device="cpu", rerank_with=dense,
                                            rerank_weight=0.7).retrieve(queries, top_k=4)
    for hits, want in zip(search(queries, top_k=4, batch_size=2), expected):
        assert [h["image_key"] for h in hits] == [key for key, _ in want]
        assert [h["score"] for h in hits] == pytest.approx([score for _, score in want], abs=1e-4)
    plain = [h["image_key"] for h in remote_pipeline(generative)(QUERY, top_k=4)]
    assert sorted(plain) == sorted(h["image_key"] for h in search(QUERY, top_k=4))  # same candidates, re-ordered
    with pytest.raises(ValueError, match="ranks by itself"):
        remote_pipeline(dense, rerank_with=dense)


def test_bad_queries_are_refused_clearly(checkpoints):
    search = remote_pipeline(checkpoints["cross_attention"])
    with pytest.raises(ValueError, match="empty query"):
        search("   ")
    with pytest.raises(ValueError, match="top_k"):
        search(QUERY, top_k=0)
    with pytest.raises(TypeError, match="a string or an image"):
        search(42)
    with pytest.raises(ValueError, match="separate calls"):
        search([QUERY, Image.new("RGB", (64, 64))], batch_size=2)
    with pytest.raises(ValueError, match="trust_remote_code"):
        from transformers import pipeline

        pipeline(TASK, model=checkpoints["cross_attention"], device="cpu")


def test_the_pipeline_runs_without_this_package(checkpoints):
    """Only transformers and the checkpoint's own files: importing vit_t5_dsi is made impossible."""
    script = (
        "import sys, json\n"
        "sys.modules['vit_t5_dsi'] = None\n"
        "from transformers import pipeline, AutoProcessor\n"
        f"search = pipeline({TASK!r}, model=sys.argv[1], trust_remote_code=True, device='cpu')\n"
        "AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        f"print(json.dumps([h['image_key'] for h in search({QUERY!r}, top_k=3)]))\n")
    result = subprocess.run([sys.executable, "-c", script, checkpoints["codebook"]], capture_output=True, text=True,
                            cwd="/", timeout=300, env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    keys = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(keys) == 3 and set(keys) <= set(index_of(checkpoints["codebook"])["keys"])


def test_the_in_process_pipeline_is_registered(checkpoints):
    from transformers import pipeline

    from vit_t5_dsi import TextToImageRetrievalPipeline, ViTT5DSIProcessor, load_dsi_model

    checkpoint = checkpoints["dual_encoder"]
    search = pipeline(TASK, model=load_dsi_model(checkpoint), processor=ViTT5DSIProcessor.from_pretrained(checkpoint),
                      device="cpu")
    assert isinstance(search, TextToImageRetrievalPipeline)
    check_hits(search(QUERY, top_k=5), checkpoint, 5)


# ----- the model card ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(SCHEMES))
def test_the_card_tells_the_hub_what_the_checkpoint_is(checkpoints, variant):
    from huggingface_hub import ModelCard

    checkpoint = checkpoints[variant]
    card = ModelCard.load(os.path.join(checkpoint, "README.md"))
    assert card.data.pipeline_tag == "visual-document-retrieval"  # the Hub's text -> images retrieval task
    assert card.data.library_name == "transformers"
    assert {TASK, "image-retrieval", "generative-retrieval", "custom_code"} <= set(card.data.tags)
    assert f'pipeline("{TASK}", model="{checkpoint}", trust_remote_code=True)' in card.text
    # every checkpoint the card points at is this one, and every web link is a paper that exists
    assert set(re.findall(r'from_pretrained\("([^"]+)"', card.text)) == {checkpoint}
    assert all(url.startswith("https://arxiv.org/") for url in re.findall(r"https?://[^\s)\"']+", card.text))


# ----- the Gradio app -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def running_app(checkpoints):
    pytest.importorskip("gradio", reason="the app extra: pip install -e '.[app]'")
    with RunningApp(checkpoints["cross_attention"]) as app:
        yield app


def test_app_messages_instead_of_stack_traces(checkpoints, tmp_path):
    from vit_t5_dsi.search.app import SearchPage, load_search_pipeline

    page = SearchPage(load_search_pipeline(checkpoints["cross_attention"], "cpu"))
    gallery, message = page("", None, 5)
    assert gallery == [] and "Type a caption" in message
    gallery, message = page("a large zebra", None, 3)
    assert len(gallery) == 3 and "zebra" in message and "vocabulary" in message
    gallery, message = page(None, Image.new("RGB", (64, 64), "red"), 2)
    assert len(gallery) == 2 and "image query" in message
    empty = tmp_path / "nowhere"
    empty.mkdir()
    gallery, message = SearchPage(load_search_pipeline(checkpoints["cross_attention"], "cpu", str(empty)),
                                  str(empty))(QUERY, None, 2)
    assert gallery == [] and "--image_dir" in message and "have no image file" in message


def test_app_reranks_with_the_dense_first_folder_when_there_is_one(checkpoints, tmp_path):
    from vit_t5_dsi.search.app import SearchPage, load_search_pipeline

    assert load_search_pipeline(checkpoints["cross_attention"], "cpu").reranker is None
    run = tmp_path / "run"
    shutil.copytree(checkpoints["cross_attention"], run)
    shutil.copytree(checkpoints["dual_encoder"], run / "dual_encoder")
    page = SearchPage(load_search_pipeline(str(run), "cpu"))
    gallery, message = page(QUERY, None, 3)
    assert len(gallery) == 3 and "re-ranked by the dual encoder" in message
    gallery, message = SearchPage(load_search_pipeline(str(run), "cpu", rerank=False))(QUERY, None, 3)
    assert len(gallery) == 3 and "re-ranked" not in message


def test_app_refuses_a_directory_that_is_not_a_trained_checkpoint(tmp_path):
    result = subprocess.run([sys.executable, "-m", "vit_t5_dsi.search.app", "--model", str(tmp_path)],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2 and "--model" in result.stderr and "Traceback" not in result.stderr


def test_gradio_client_gets_the_pipelines_answer(running_app, checkpoints):
    from gradio_client import Client

    expected = [hit["image_key"] for hit in remote_pipeline(checkpoints["cross_attention"])(QUERY, top_k=4)]
    gallery, message = Client(running_app.url, verbose=False).predict(QUERY, None, 4, api_name="/search")
    assert [item["caption"].split(" · ")[0] for item in gallery] == expected
    assert message.startswith("Top 4 of 40")


@pytest.mark.slow
def test_the_app_in_a_real_browser(running_app, checkpoints, tmp_path):
    problem = browser_missing()
    if problem:
        if os.environ.get("VIT_T5_DSI_REQUIRE_BROWSER"):  # CI installs Chromium: there, a missing browser fails
            pytest.fail(problem)
        pytest.skip(problem)
    expected = [hit["image_key"] for hit in remote_pipeline(checkpoints["cross_attention"])(QUERY, top_k=4)]
    driver = headless_chromium()
    try:
        keys, message = search_in_browser(driver, running_app.url, QUERY, 4, str(tmp_path / "app.png"))
    finally:
        driver.quit()
    assert keys == expected and "Top 4 of 40" in message
    with Image.open(tmp_path / "app.png") as shot:
        assert shot.format == "PNG" and shot.size[0] >= 800
