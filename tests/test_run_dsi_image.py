"""End-to-end runs of the main job on tiny synthetic collections (offline, CPU)."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import run_dsi_image
from conftest import ROOT, accelerate_launcher, run_script, tiny_args

METRIC_KEYS = [f"{p}_{m}" for p in ("eval", "seen", "index") for m in ("hits@1", "hits@5", "hits@10", "mrr@10")]

@pytest.mark.parametrize("variant, scheme", [("cross_attention", "semantic"), ("codebook", "naive"),
                                             ("dual_encoder", "naive")])
def test_each_variant_trains_evaluates_and_writes_the_same_keys(tmp_path, variant, scheme):
    metrics = run_dsi_image.main(tiny_args(tmp_path, "--variant", variant, "--docid_scheme", scheme,
                                           "--save_strategy", "steps", "--save_steps", "2"))
    results = json.loads((tmp_path / "out" / "all_results.json").read_text())
    for key in METRIC_KEYS:
        assert key in results and 0.0 <= results[key] <= 1.0, key
        assert results[key] == pytest.approx(metrics[key])
    assert results["eval_num_queries"] > 0 and results["world_size"] == 1
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert (tmp_path / "out" / "image_index.json").exists()
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"`{variant}`" in card and "| held-out captions |" in card and "trust_remote_code=True" in card
    from vit_t5_dsi import DSIRetriever

    checkpoint = max((tmp_path / "out").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    # a mid-run checkpoint retrieves on its own too
    assert (checkpoint / "processor_config.json").exists()
    hits = DSIRetriever.from_pretrained(str(checkpoint), device="cpu").retrieve(["a red circle"], top_k=3)[0]
    keys = json.loads((tmp_path / "out" / "image_index.json").read_text())["keys"]
    assert len(hits) >= 1 and {key for key, _ in hits} <= set(keys)


def test_demo_checkpoint_retrieves_in_a_fresh_process(tmp_path):
    run_dsi_image.main(tiny_args(tmp_path, "--docid_scheme", "atomic"))
    out = run_script_cli(["--model", str(tmp_path / "out"), "--top_k", "3", "--json", "a large red circle",
                          "a small blue square in the center"])
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    keys = json.loads((tmp_path / "out" / "image_index.json").read_text())["keys"]
    assert len(lines) == 2
    for line in lines:
        images = [r["image_key"] for r in line["results"]]
        assert 1 <= len(images) <= 3 and len(set(images)) == len(images) and set(images) <= set(keys)


def run_script_cli(args):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "retrieve_images.py"), *args], capture_output=True,
                            text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_evaluation_during_training_uses_constrained_search(tmp_path):
    run_dsi_image.main(tiny_args(tmp_path, "--eval_strategy", "steps", "--eval_steps", "3", "--max_steps", "6",
                                 "--do_eval", "False"))
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    evaluations = [entry for entry in state["log_history"] if "eval_hits@10" in entry]
    assert [entry["step"] for entry in evaluations] == [3, 6]
    assert [entry["step"] for entry in state["log_history"] if "eval_index_hits@1" in entry] == [3, 6]


def test_evaluating_during_training_does_not_change_the_model(tmp_path):
    """Each evaluation DataLoader draws a seed from torch's global generator; the trainer restores it, so the
    training sampler and dropout see the same random numbers with or without evaluations."""
    common = ["--max_steps", "8", "--augment", "True"]
    plain = run_dsi_image.main(tiny_args(tmp_path, *common, "--output_dir", str(tmp_path / "plain")))
    evaluated = run_dsi_image.main(tiny_args(tmp_path, *common, "--output_dir", str(tmp_path / "evaluated"),
                                             "--eval_strategy", "steps", "--eval_steps", "2"))
    assert (tmp_path / "plain" / "model.safetensors").read_bytes() == \
        (tmp_path / "evaluated" / "model.safetensors").read_bytes()
    for key in METRIC_KEYS + ["train_loss"]:
        assert evaluated[key] == plain[key], key


def test_resume_after_a_kill_reaches_the_same_final_step_with_the_same_index(tmp_path):
    args = tiny_args(tmp_path, "--max_steps", "40", "--save_strategy", "steps", "--save_steps", "4",
                     "--save_total_limit", "5", "--do_eval", "False")
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "run_dsi_image.py"), *args], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoint = tmp_path / "out" / "checkpoint-8"
    deadline = time.time() + 300
    while not (checkpoint / "dsi_trainer_state.json").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "out" / "model.safetensors").exists(), "the run finished before it could be stopped"
    index_before = (checkpoint / "image_index.json").read_text()
    result = run_script(args + ["--resume_from_checkpoint", str(checkpoint)])
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["global_step"] == 40
    assert (tmp_path / "out" / "image_index.json").read_text() == index_before


def test_wandb_offline_logs_losses_and_hits(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="install the 'wandb' extra: pip install -e '.[wandb]'")
    # a wandb run started in this test process earlier (in-process runs of other tests) leaves variables naming
    # its service; a subprocess that inherits them logs to that service instead of its own run file
    for name in [name for name in os.environ if name.startswith("WANDB_")]:
        monkeypatch.delenv(name)
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_API_KEY": ""}
    result = run_script(tiny_args(tmp_path, "--report_to", "wandb", "--run_name", "dsi-test"), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    records = next(runs[0].glob("run-*.wandb")).read_bytes()  # offline runs keep every logged record here
    for key in (b"train/loss", b"eval/hits@10", b"eval/seen_hits@1", b"eval/index_hits@1"):
        assert key in records, key


@pytest.mark.slow
def test_two_processes_count_every_query_once(tmp_path):
    """Two gloo processes evaluate the single-process checkpoint: identical Hits@k, world size 2."""
    single = tiny_args(tmp_path, images=70, epochs=2)
    run_dsi_image.main(single)
    checkpoint = str(tmp_path / "out")
    reference = json.loads((tmp_path / "out" / "all_results.json").read_text())
    eval_args = ["--model_name_or_path", checkpoint, "--do_train", "False", "--output_dir", str(tmp_path / "ddp"),
                 "--demo_dir", str(tmp_path / "data"), "--demo_num_images", "70", "--per_device_eval_batch_size", "5",
                 "--disable_tqdm", "True", "--use_cpu", "True"]
    launcher = accelerate_launcher()
    result = run_script(eval_args, launcher=launcher, env={"MASTER_PORT": "29533"})
    assert result.returncode == 0, result.stderr[-4000:]
    distributed = json.loads((tmp_path / "ddp" / "all_results.json").read_text())
    assert distributed["world_size"] == 2
    assert reference["eval_num_queries"] % 10 != 0, "pick sizes whose last batch is padded across processes"
    for prefix in ("eval", "seen", "index"):
        assert distributed[f"{prefix}_num_queries"] == reference[f"{prefix}_num_queries"]
    assert distributed["eval_num_queries"] == 42
    for key in METRIC_KEYS:
        assert distributed[key] == pytest.approx(reference[key], abs=1e-9), key
    for prefix in ("eval", "seen", "index"):  # every query once, in its set's order, as one process wrote them
        ranked = [(r["query_id"], [h["image_key"] for h in r["top_k"]]) for r in
                  map(json.loads, (tmp_path / "ddp" / f"{prefix}_predictions.jsonl").read_text().splitlines())]
        assert ranked == [(r["query_id"], [h["image_key"] for h in r["top_k"]]) for r in
                          map(json.loads, (tmp_path / "out" / f"{prefix}_predictions.jsonl").read_text().splitlines())]


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["semantic", "atomic"])
def test_two_processes_train(tmp_path, scheme):
    """Both processes train on the ids the main process built (atomic ids also add tokens on every process)."""
    launcher = accelerate_launcher()
    result = run_script(tiny_args(tmp_path, "--use_cpu", "True", "--max_steps", "4", "--docid_scheme", scheme),
                        launcher=launcher, env={"MASTER_PORT": "29534" if scheme == "semantic" else "29535"})
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((tmp_path / "out" / "all_results.json").read_text())
    assert results["world_size"] == 2 and "eval_hits@10" in results
    assert results["eval_num_queries"] == json.loads((tmp_path / "out" / "protocol.json").read_text())[
        "num_eval_queries"]
    # the caption tokenizer was trained once, on the main process; every rank checked it holds the same vocabulary
    assert "Tokenizer vocabulary identical on all 2 processes" in result.stdout


@pytest.mark.slow
def test_two_process_runs_exit_cleanly_every_time(tmp_path):
    """Both ranks exit 0 (no SIGABRT from a process group left alive at interpreter exit), progress bars on."""
    launcher = accelerate_launcher()
    for attempt in range(3):
        args = tiny_args(tmp_path, "--use_cpu", "True", "--max_steps", "6", "--overwrite_output_dir", "True",
                         "--disable_tqdm", "False", "--max_index_eval_images", "10")
        result = run_script(args, launcher=launcher, env={"MASTER_PORT": str(29540 + attempt)})
        assert result.returncode == 0, (attempt, result.stderr[-3000:])
        assert "terminate called" not in result.stderr


@pytest.mark.parametrize("hub_model_id, repo", [("someone/dsi-demo", "someone/dsi-demo"), (None, "someone/out")])
def test_push_to_hub_uploads_the_checkpoint_with_its_card(tmp_path, monkeypatch, hub_model_id, repo):
    import transformers.trainer as trainer_module

    calls = {}

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):  # like the Hub: a bare name lands in the user's namespace
            calls["repo"] = repo_id if "/" in repo_id else f"someone/{repo_id}"
            return type("Url", (), {"repo_id": calls["repo"]})()

        def upload_folder(self, repo_id, folder_path, **kwargs):
            calls["files"] = sorted(os.listdir(folder_path))
            calls["card"] = open(os.path.join(folder_path, "README.md")).read()

    monkeypatch.setattr(trainer_module, "hf_api", lambda: FakeApi())
    hub = ["--hub_model_id", hub_model_id] if hub_model_id else []
    run_dsi_image.main(tiny_args(tmp_path, "--push_to_hub", "True", *hub))
    assert calls["repo"] == repo
    assert {"model.safetensors", "image_index.json", "config.json", "README.md", "modeling_vit_t5_dsi.py",
            "pipeline_text_to_image_retrieval.py", "tokenizer.json", "processor_config.json"} <= set(calls["files"])
    # the card points at the repo it was pushed to, and nowhere else
    assert set(re.findall(r'from_pretrained\("([^"]+)"', calls["card"])) == {repo}
    assert f'pipeline("text-to-image-retrieval", model="{repo}", trust_remote_code=True)' in calls["card"]


def test_arguments_from_a_yaml_file(tmp_path):
    import yaml

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "out"), "demo_dir": str(tmp_path / "data"), "demo_num_images": 40,
        "max_steps": 2, "save_strategy": "no", "disable_tqdm": True, "semantic_max_leaf_size": 8,
        "tokenizer_vocab_size": 200, "per_device_train_batch_size": 16}))
    run_dsi_image.main([str(config)])
    assert (tmp_path / "out" / "all_results.json").exists()


@pytest.mark.parametrize("extra, message", [
    (["--fp16", "True"], "--fp16 with T5"),
    (["--karpathy_json", "x.json"], "--karpathy_json needs --image_dir"),
    (["--vision_model_name_or_path", "google/vit-base-patch16-224-in21k"], "go together"),
    (["--karpathy_json", "missing.json", "--image_dir", "."], "missing.json: no such file"),
    (["--dataloader_num_workers", "2", "--dataloader_persistent_workers", "True", "--augment", "True"],
     "--dataloader_persistent_workers keeps the first epoch's copy"),
    (["--dataloader_num_workers", "2", "--dataloader_persistent_workers", "True", "--captioning_ratio", "0.5",
      "--pseudo_query_at", "0.5"], "--dataloader_persistent_workers keeps the first epoch's copy"),
])
def test_bad_flags_fail_before_training(tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        run_dsi_image.main(tiny_args(tmp_path, *extra))
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_the_image_cache_budget_is_one_per_machine(tmp_path, monkeypatch):
    """--image_cache_mb is split between the machine's training processes; each share is one block that its
    DataLoader workers fill together (tests/test_data.py), and the run trains with workers."""
    from vit_t5_dsi.training.trainer import DSITrainer

    budgets = []
    original = DSITrainer.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        budgets.append(self.data_collator.decoded_images.budget)

    monkeypatch.setattr(DSITrainer, "__init__", spy)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    metrics = run_dsi_image.main(tiny_args(tmp_path, "--image_cache_mb", "8", "--max_steps", "3",
                                           "--dataloader_num_workers", "2"))
    assert budgets == [2 * 2 ** 20] and np.isfinite(metrics["train_loss"])


def test_bf16_training_steps(tmp_path):
    metrics = run_dsi_image.main(tiny_args(tmp_path, "--bf16", "True", "--use_cpu", "True", "--max_steps", "3"))
    assert np.isfinite(metrics["train_loss"]) and "eval_hits@10" in metrics


def test_demo_uses_small_semantic_leaves_unless_told_otherwise(tmp_path):
    def args(*extra):
        base = tiny_args(tmp_path, "--max_steps", "1", "--do_eval", "False", *extra)
        i = base.index("--semantic_max_leaf_size")
        return base[:i] + base[i + 2:] if not extra else base

    run_dsi_image.main(args())  # the demo's own default: leaves of at most 10 images
    ids = json.loads((tmp_path / "out" / "image_index.json").read_text())["id_strings"]
    assert all(len(i.split()) >= 2 for i in ids) and max(int(i.split()[-1]) for i in ids) < 10
    run_dsi_image.main(args("--semantic_max_leaf_size", "100", "--overwrite_output_dir", "True"))  # DSI's c
    ids = json.loads((tmp_path / "out" / "image_index.json").read_text())["id_strings"]
    assert all(len(i.split()) == 1 for i in ids)


# ----- nothing lost or silently replaced ---------------------------------------------------------------

def train_once(tmp_path, *extra, images=40):
    run_dsi_image.main(tiny_args(tmp_path, "--max_steps", "2", "--do_eval", "False", *extra, images=images))
    return tmp_path / "out"


def test_a_checkpoint_whose_index_does_not_cover_the_collection_needs_reindex(tmp_path):
    checkpoint = train_once(tmp_path)
    other = tiny_args(tmp_path, "--model_name_or_path", str(checkpoint), "--output_dir", str(tmp_path / "again"),
                      "--max_steps", "2", "--do_eval", "False", images=45)
    with pytest.raises(run_dsi_image.UsageError, match="holds 40 images, this collection 45.*--reindex"):
        run_dsi_image.main(other)
    assert not (tmp_path / "again").exists()
    run_dsi_image.main(other + ["--reindex", "True"])
    assert len(json.loads((tmp_path / "again" / "image_index.json").read_text())["keys"]) == 45


def test_training_into_the_checkpoint_it_loads_from_is_refused(tmp_path):
    checkpoint = train_once(tmp_path)
    before = (checkpoint / "model.safetensors").read_bytes()
    with pytest.raises(run_dsi_image.UsageError, match="is the checkpoint --model_name_or_path loads from"):
        run_dsi_image.main(tiny_args(tmp_path, "--model_name_or_path", str(checkpoint), "--overwrite_output_dir",
                                     "True", "--max_steps", "2"))
    assert (checkpoint / "model.safetensors").read_bytes() == before


def test_an_evaluate_only_run_never_rewrites_weights_or_index(tmp_path):
    checkpoint = train_once(tmp_path)
    files = ("model.safetensors", "image_index.json", "config.json", "tokenizer.json")
    before = {name: ((checkpoint / name).read_bytes(), (checkpoint / name).stat().st_mtime_ns) for name in files}
    run_dsi_image.main(tiny_args(tmp_path, "--model_name_or_path", str(checkpoint), "--output_dir", str(checkpoint),
                                 "--overwrite_output_dir", "True", "--do_train", "False"))
    for name in files:
        assert ((checkpoint / name).read_bytes(), (checkpoint / name).stat().st_mtime_ns) == before[name], name
    results = json.loads((checkpoint / "all_results.json").read_text())
    assert "eval_hits@1" in results and "train_loss" not in results  # the old run's results are not merged in


def test_a_non_empty_output_dir_is_refused_and_overwrite_replaces_the_old_run(tmp_path):
    output = train_once(tmp_path)
    with pytest.raises(run_dsi_image.UsageError, match="is not empty.*--overwrite_output_dir"):
        train_once(tmp_path)
    results = json.loads((output / "all_results.json").read_text())
    (output / "all_results.json").write_text(json.dumps({**results, "stale_metric": 1.0}))
    (output / "checkpoint-999").mkdir()
    (output / "image_index.json").write_text("{}")
    train_once(tmp_path, "--overwrite_output_dir", "True", images=30)
    assert "stale_metric" not in json.loads((output / "all_results.json").read_text())
    assert not (output / "checkpoint-999").exists()
    assert len(json.loads((output / "image_index.json").read_text())["keys"]) == 30


@pytest.mark.parametrize("extra, message", [
    (["--hub_token", "hf_abcdefghijklmnopqrstuvwxyz"], "--hub_token is refused"),
    (["--karpathy_json", "missing.json", "--image_dir", "."], "missing.json: no such file"),
    (["--variant", "bogus"], "argument --variant: invalid choice: 'bogus'"),
])
def test_usage_errors_print_one_line_and_exit_2(tmp_path, extra, message):
    result = run_script(tiny_args(tmp_path, *extra))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and message in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, value", [("--do_predict", "True"), ("--predict_with_generate", "True"),
                                         ("--generation_num_beams", "4"), ("--generation_max_length", "8")])
def test_trainer_flags_that_would_do_nothing_are_refused(tmp_path, flag, value):
    with pytest.raises(run_dsi_image.UsageError, match=f"{flag} has no effect here"):
        run_dsi_image.main(tiny_args(tmp_path, flag, value))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, message", [
    (["--retrieval_k", "50"], "--retrieval_k 50 is larger than the 40 indexed images"),
    (["--heldout_splits", "train,test,val"], "Every image of .* is held out"),
])
def test_degenerate_protocols_are_refused_clearly(tmp_path, extra, message):
    with pytest.raises(run_dsi_image.UsageError, match=message):
        run_dsi_image.main(tiny_args(tmp_path, *extra))


def test_indexing_evaluation_can_be_turned_off(tmp_path):
    metrics = run_dsi_image.main(tiny_args(tmp_path, "--max_steps", "1", "--max_index_eval_images", "0"))
    assert "eval_hits@1" in metrics and not any(key.startswith("index_") for key in metrics)


@pytest.mark.slow
def test_two_processes_write_pseudo_queries_during_training(tmp_path):
    """Each process captions its share of the images; both train on the same, complete set."""
    launcher = accelerate_launcher()
    result = run_script(tiny_args(tmp_path, "--use_cpu", "True", "--num_train_epochs", "3", "--captioning_ratio", "0.5",
                                  "--pseudo_query_epochs", "1", "--num_pseudo_queries", "3",
                                  "--pseudo_query_images", "all"),
                        launcher=launcher, env={"MASTER_PORT": "29545"})
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "pseudo_queries.jsonl").read_text().splitlines()]
    written = {row["image_id"] for row in rows}
    keys = set(json.loads((tmp_path / "out" / "image_index.json").read_text())["keys"])
    assert written <= keys and len(written) >= 30  # both shares came back (an image whose samples were all empty
    # may have none)
    protocol = json.loads((tmp_path / "out" / "protocol.json").read_text())
    assert protocol["pseudo_queries"]["num_pseudo_queries"] == len(rows) and "writer_caption_bleu" in protocol[
        "pseudo_queries"]


def test_the_default_recipe_learns(tmp_path):
    """What a user gets with data flags only (here the demo collection's, tiny): a dual encoder first, rq ids cut
    from it, the generative model started from its towers, captioning, pseudo-queries at 20% of training (kept
    when the dual encoder finds their image) and re-ranking; the run says so, reports all three kinds of figures,
    and has learned: nearly every image it indexes memorised, captions of training images found."""
    args = ["--output_dir", str(tmp_path / "out"), "--demo_dir", str(tmp_path / "data"), "--demo_num_images", "24",
            "--num_train_epochs", "60", "--per_device_train_batch_size", "64", "--disable_tqdm", "True",
            "--tokenizer_vocab_size", "200", "--save_strategy", "no", "--logging_steps", "50"]
    result = run_script(args)
    assert result.returncode == 0, result.stderr[-3000:]
    first = [line for line in result.stdout.splitlines() if " - INFO - " in line][:3]
    assert any("Recipe: rq ids from a dual encoder trained first" in line and "re-ranked by dense_first" in line
               for line in first), first
    results = json.loads((tmp_path / "out" / "all_results.json").read_text())
    for key in ("eval_hits@1", "eval_rerank_hits@1", "dense_eval_hits@1", "seen_hits@1", "seen_rerank_hits@1",
                "dense_seen_hits@1"):
        assert key in results, key
    # learned, far from chance (1/24 at @1, 10/24 at @10): nearly every image memorised, seen captions mostly found
    # (one thread or two moves seen@10 between 0.95 and 1.0)
    assert results["index_hits@1"] >= 0.9 and results["seen_hits@10"] >= 0.9 and results["seen_hits@1"] >= 0.3
    protocol = json.loads((tmp_path / "out" / "protocol.json").read_text())
    assert protocol["docid_scheme"] == "rq" and protocol["pseudo_queries"]["epochs"] == [12]
    assert protocol["pseudo_queries"]["filter_top_k"] == 1 and protocol["pseudo_queries"]["num_images"] > 0
    dense_state = json.loads((tmp_path / "out" / "dual_encoder" / "trainer_state.json").read_text())
    assert dense_state["epoch"] == pytest.approx(60 * 2 / 3, abs=0.5)  # the dense budget follows the generative one


def test_max_samples_cap_training_captions_and_evaluation_queries(tmp_path):
    metrics = run_dsi_image.main(tiny_args(tmp_path, "--max_train_samples", "10", "--max_eval_samples", "5"))
    protocol = json.loads((tmp_path / "out" / "protocol.json").read_text())
    assert protocol["num_train_queries"] == 10 and protocol["num_indexed"] == 40  # every image still indexed
    assert metrics["eval_num_queries"] == 5 and metrics["seen_num_queries"] <= 5


def test_evaluation_during_training_samples_and_the_final_one_ranks_every_query(tmp_path):
    metrics = run_dsi_image.main(tiny_args(tmp_path, "--eval_strategy", "epoch", "--eval_queries_during_training",
                                           "3", epochs=2))
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    during = [entry for entry in state["log_history"] if "eval_num_queries" in entry]
    assert len(during) == 2 and all(entry["eval_num_queries"] == 3 for entry in during)
    assert metrics["eval_num_queries"] > 3
