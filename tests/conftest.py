"""Offline, tiny, deterministic fixtures shared by the tests, and the helpers of the end-to-end resume tests."""

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

# A temporary HF_HOME, set before anything imports transformers or datasets: both fix their cache paths (remote-code
# modules included) at import, so setting it later would split this process and its subprocesses across two caches.
_HF_HOME = tempfile.mkdtemp(prefix="vit_t5_dsi_hf_home_")
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_DATASETS_CACHE"] = os.path.join(_HF_HOME, "datasets")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# under pytest-xdist (`-n 2`) each worker, and every run it starts, takes one thread: the tiny models gain nothing
# from a second one, and two workers x two threads would fight over the cores
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402  (after the environment above)


@pytest.fixture(autouse=True, scope="session")
def _isolated_hf_home():
    yield
    shutil.rmtree(_HF_HOME, ignore_errors=True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


CAPTIONS = [
    "a large red circle in the top left",
    "a small blue square at the bottom right",
    "two green triangles and a yellow star",
    "there is a purple cross in the center of the picture",
    "an orange circle next to a white square",
]


@pytest.fixture(scope="session")
def tokenizer():
    from vit_t5_dsi.data.caption_tokenizer import train_caption_tokenizer

    return train_caption_tokenizer(CAPTIONS * 4, vocab_size=160)


def tiny_config(variant="cross_attention", vocab_size=160, **kwargs):
    from vit_t5_dsi.checkpoint.configuration_vit_t5_dsi import ViTT5DSIConfig

    return ViTT5DSIConfig.from_preset("tiny", variant=variant, vocab_size=vocab_size, **kwargs)


# ----- end-to-end runs of run_dsi_image.py, resumed and compared (test_resume.py, test_kill_and_resume.py) ---------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Figures that are wall-clock measurements differ between any two runs; everything else must be equal.
TIMING_SUFFIXES = ("_runtime", "_samples_per_second", "_steps_per_second")
# `train_loss` is a float sum over every step: a resumed run adds the same per-step losses grouped at another
# boundary (the checkpoint instead of a logging step), so the last bits of the sum may differ.
TRAIN_LOSS_TOLERANCE = 1e-6
# the default recipe otherwise: dense stage, rq ids, captioning, round-trip filter, re-ranking
RECIPE = ("--pseudo_query_epochs", "1,2", "--augment", "True", "--per_device_train_batch_size", "64",
          "--max_steps", "24", "--save_steps", "4")


def tiny_run_args(output_dir, data_dir, *extra):
    """A tiny, checkpointing run of run_dsi_image.py on the built-in demo (40 scenes), seed 7."""
    return ["--output_dir", str(output_dir), "--demo_dir", str(data_dir), "--demo_num_images", "40",
            "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "16", "--disable_tqdm", "True",
            "--semantic_max_leaf_size", "8", "--semantic_num_clusters", "4", "--tokenizer_vocab_size", "200",
            "--logging_steps", "5", "--save_strategy", "steps", "--save_total_limit", "20", "--seed", "7",
            "--use_cpu", "True", *extra]


def run_training(args, launcher=None, env=None):
    """`python run_dsi_image.py ARGS` (or under `launcher`), which must succeed."""
    command = (launcher or [sys.executable]) + [os.path.join(ROOT, "run_dsi_image.py"), *args]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=900,
                            env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def assert_same_results(uninterrupted_dir, resumed_dir):
    """Two runs ended alike: every non-timing figure of all_results.json (train_loss within
    TRAIN_LOSS_TOLERANCE), the final weights bit for bit, the pseudo-queries and their protocol."""
    from safetensors.torch import load_file

    full = json.loads((uninterrupted_dir / "all_results.json").read_text())
    resumed = json.loads((resumed_dir / "all_results.json").read_text())
    assert set(full) == set(resumed)
    compared = 0
    for key, value in full.items():
        if key.endswith(TIMING_SUFFIXES):
            continue
        if key.endswith("train_loss"):
            assert resumed[key] == pytest.approx(value, rel=TRAIN_LOSS_TOLERANCE)
        else:
            assert resumed[key] == value, key
        compared += 1
    assert compared >= 15
    for name in ("model.safetensors",):
        a, b = load_file(str(uninterrupted_dir / name)), load_file(str(resumed_dir / name))
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), f"{name} differs"
    protocol = [json.loads((d / "protocol.json").read_text())["pseudo_queries"]
                for d in (uninterrupted_dir, resumed_dir)]
    for written in protocol:
        written.pop("writing_seconds", None)  # wall-clock
    assert protocol[0] == protocol[1]
    if (uninterrupted_dir / "pseudo_queries.jsonl").exists():
        assert (uninterrupted_dir / "pseudo_queries.jsonl").read_text() == \
            (resumed_dir / "pseudo_queries.jsonl").read_text()


def accelerate_launcher(num_processes: int = 2, port: int | None = None, script: bool = True) -> list[str]:
    """`accelerate launch` of the multi-process CPU tests (gloo), followed by run_dsi_image.py unless `script` is
    False; `port` keeps concurrent launches apart."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
               str(num_processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if port is not None:
        command += ["--main_process_port", str(port)]
    return command + ([os.path.join(ROOT, "run_dsi_image.py")] if script else [])


# ----- shared helpers of several test modules --------------------------------------------------------------------
def write_images(directory, names, size=16):
    """Small solid-colour images named `names` in `directory`."""
    from PIL import Image

    os.makedirs(directory, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (size, size), (i * 20 % 255, 100, 50)).save(os.path.join(directory, name))




def tiny_args(tmp_path, *extra, images=40, epochs=1):
    """A tiny run on the built-in demo collection: semantic ids from the model's own tower, no dense stage, no
    captioning, unless `extra` says otherwise (the default recipe trains two models and a captioner;
    `test_the_default_recipe_learns` runs it)."""
    return ["--docid_scheme", "semantic", "--dense_first", "False", "--captioning_ratio", "0", "--output_dir", str(tmp_path / "out"), "--demo_dir", str(tmp_path / "data"),
            "--demo_num_images", str(images), "--num_train_epochs", str(epochs), "--per_device_train_batch_size",
            "16", "--per_device_eval_batch_size", "16", "--disable_tqdm", "True", "--save_strategy", "no",
            "--semantic_max_leaf_size", "8", "--semantic_num_clusters", "4", "--tokenizer_vocab_size", "200",
            "--logging_steps", "5", *extra]


def run_script(args, env=None, timeout=600, launcher=None):
    command = (launcher or [sys.executable, os.path.join(ROOT, "run_dsi_image.py")]) + args
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env={**os.environ, **(env or {})})


def splits_of_scenes(directory, count: int = 23):
    from vit_t5_dsi.data.collection import load_karpathy
    from vit_t5_dsi.data.splits import build_dsi_splits
    from vit_t5_dsi.data.synthetic_scenes import generate_scenes

    path = generate_scenes(str(directory), count, image_size=32, seed=0, progress=False)
    return build_dsi_splits(load_karpathy(path, str(directory / "images")), seen_captions_per_image=1)


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    """23 synthetic scenes split by the protocol (a module-scoped fixture of the trainer-level tests)."""
    return splits_of_scenes(tmp_path_factory.mktemp("scenes"))


def make_trainer(tmp_path, splits, tokenizer, variant, **args):
    """A DSITrainer over `splits` with a tiny untrained model of `variant` and naive ids; `args` are training
    arguments."""
    from transformers import Seq2SeqTrainingArguments

    from vit_t5_dsi import ViTT5DSIProcessor, build_image_index, model_class_for_variant
    from vit_t5_dsi.data.rows import ImageSource, evaluation_sets, training_stream
    from vit_t5_dsi.training.trainer import DSITrainer

    model = model_class_for_variant(variant)(tiny_config(variant))
    model.image_index = build_image_index(splits.index["image_key"][:], tokenizer, "naive")
    processor = ViTT5DSIProcessor.for_model(model.config, tokenizer)
    arguments = Seq2SeqTrainingArguments(**{"output_dir": str(tmp_path / "out"), "per_device_eval_batch_size": 4,
                                            "per_device_train_batch_size": 8, "report_to": "none", "use_cpu": True,
                                            "disable_tqdm": True, **args})
    return DSITrainer(model=model, args=arguments, images=ImageSource(splits.index), processing_class=processor,
                      train_dataset=training_stream(splits, variant), eval_dataset=evaluation_sets(splits))
