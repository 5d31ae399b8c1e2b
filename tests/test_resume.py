"""A resumed run is the run it resumed: every weight as saved, then the same data, crops, pseudo-queries and
figures as the same run uninterrupted."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import RECIPE, ROOT, accelerate_launcher, assert_same_results, make_trainer, tiny_config
from conftest import run_training as _run, tiny_run_args as _tiny_run
from vit_t5_dsi import ImageIndex, model_class_for_variant
from vit_t5_dsi.training.trainer import CheckpointMismatchError, load_checkpoint_weights
from vit_t5_dsi.checkpoint.loading import load_dsi_model


@pytest.mark.parametrize("variant", ["cross_attention", "codebook", "dual_encoder"])
def test_resuming_loads_every_weight_of_the_checkpoint(tmp_path, splits, tokenizer, variant):  # noqa: F811
    trainer = make_trainer(tmp_path, splits, tokenizer, variant, max_steps=2, save_strategy="steps", save_steps=2)
    trainer.train()
    checkpoint = str(tmp_path / "out" / "checkpoint-2")
    saved = load_dsi_model(checkpoint).state_dict()

    fresh = make_trainer(tmp_path / "again", splits, tokenizer, variant)
    before = fresh.model.state_dict()
    # the bug this guards against: the raw file's keys (the ViT's legacy names) miss the model's parameters
    raw = fresh.model.load_state_dict(load_file(os.path.join(checkpoint, "model.safetensors")), strict=False)
    assert raw.missing_keys, "the checkpoint file no longer needs key conversion: this test lost its point"
    assert any(not torch.equal(before[k], saved[k]) for k in saved if "vision_model" in k)

    fresh._load_from_checkpoint(checkpoint)
    resumed = fresh.model.state_dict()
    assert set(resumed) == set(saved)
    for key, tensor in saved.items():
        assert torch.equal(resumed[key], tensor), key


def test_a_checkpoint_that_does_not_fit_is_an_error_not_a_warning(tmp_path, splits, tokenizer):  # noqa: F811
    trainer = make_trainer(tmp_path, splits, tokenizer, "cross_attention", max_steps=1, save_strategy="steps",
                           save_steps=1)
    trainer.train()
    checkpoint = str(tmp_path / "out" / "checkpoint-1")
    wider = model_class_for_variant("cross_attention")(tiny_config(vocab_size=200))
    with pytest.raises(CheckpointMismatchError, match="checkpoint-1.*of another shape"):
        load_checkpoint_weights(wider, checkpoint)
    dual = model_class_for_variant("dual_encoder")(tiny_config("dual_encoder"))
    with pytest.raises(CheckpointMismatchError, match="dual_encoder model"):
        load_checkpoint_weights(dual, checkpoint)


def resume_from_a_copy(tmp_path, args_for, step, launcher=None, env=None):
    """The run uninterrupted, then the same run as if killed right after checkpoint-`step` was written (its output
    dir holds that checkpoint and a finished dense stage), resumed with --resume_from_checkpoint."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _run(args_for(full), launcher, env)
    resumed.mkdir()
    shutil.copytree(full / f"checkpoint-{step}", resumed / f"checkpoint-{step}")
    if (full / "dual_encoder").exists():
        shutil.copytree(full / "dual_encoder", resumed / "dual_encoder")
    _run(args_for(resumed) + ["--resume_from_checkpoint", str(resumed / f"checkpoint-{step}")], launcher, env)
    assert_same_results(full, resumed)


def test_a_resumed_run_ends_with_the_results_of_the_uninterrupted_one(tmp_path):
    data = tmp_path / "data"
    resume_from_a_copy(tmp_path, lambda out: _tiny_run(out, data, "--docid_scheme", "semantic", "--dense_first",
                                                       "False", "--captioning_ratio", "0", "--max_steps", "12",
                                                       "--save_steps", "4"), step=8)


@pytest.mark.slow
def test_the_recipe_resumed_between_pseudo_query_refreshes_ends_as_uninterrupted(tmp_path):
    """Dense stage, rq ids, captioning, two pseudo-query refreshes (epochs 1 and 2, about steps 9 and 18) and
    augmentation: resumed after the first refresh and before the second."""
    data = tmp_path / "data"
    resume_from_a_copy(tmp_path, lambda out: _tiny_run(out, data, *RECIPE), step=12)


@pytest.mark.slow
def test_a_dense_stage_killed_mid_run_resumes_to_the_same_results(tmp_path):
    """SIGKILL while the dual encoder trains; the same command again picks the dense stage up at its last
    checkpoint and ends with the uninterrupted run's figures."""
    data = tmp_path / "data"
    _run(_tiny_run(tmp_path / "full", data, *RECIPE))
    # the killed run trains nothing the full run did not: it takes the full run's tokenizer, since two processes'
    # BPE training breaks ties differently (words absent from the training captions then split differently)
    args = _tiny_run(tmp_path / "killed", data, *RECIPE, "--tokenizer_name_or_path",
                     str(tmp_path / "full" / "dual_encoder"))
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "run_dsi_image.py"), *args], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    marker = tmp_path / "killed" / "dual_encoder" / "checkpoint-8" / "dsi_trainer_state.json"
    deadline = time.time() + 600
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed" / "dual_encoder" / "all_results.json").exists(), "killed too late"
    _run(args)
    assert_same_results(tmp_path / "full", tmp_path / "killed")


@pytest.mark.slow
def test_two_processes_resume_to_the_same_results(tmp_path):
    launcher = accelerate_launcher(script=False)
    data = tmp_path / "data"
    resume_from_a_copy(tmp_path, lambda out: _tiny_run(out, data, "--docid_scheme", "semantic", "--captioning_ratio",
                                                       "0.5", "--pseudo_query_epochs", "1", "--augment", "True",
                                                       "--dense_first", "False",
                                                       "--per_device_train_batch_size", "32", "--max_steps", "12",
                                                       "--save_steps", "4"),
                       step=4, launcher=launcher, env={"MASTER_PORT": "29541"})


@pytest.mark.slow
def test_a_run_killed_after_its_dense_stage_ends_as_uninterrupted(tmp_path):
    """Killed after the dense stage finished and before the generative model's first checkpoint: the same
    command reuses the dual encoder and trains the same generative model (it is seeded on its own, not by what
    training the dense stage left in the random number generators)."""
    data = tmp_path / "data"
    _run(_tiny_run(tmp_path / "full", data, *RECIPE))
    (tmp_path / "killed").mkdir()
    shutil.copytree(tmp_path / "full" / "dual_encoder", tmp_path / "killed" / "dual_encoder")
    _run(_tiny_run(tmp_path / "killed", data, *RECIPE))
    assert_same_results(tmp_path / "full", tmp_path / "killed")
