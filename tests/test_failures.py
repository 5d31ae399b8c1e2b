"""Failures outside the run's own code: a Hub push that fails, one process of a DDP run that dies."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import run_dsi_image
from conftest import ROOT
from test_run_dsi_image import tiny_args
from vit_t5_dsi.checkpoint.loading import load_dsi_model
from vit_t5_dsi.training.hub_push import HubPushError

REPO = "someone/dsi-push-test"


class FailingHub:
    """The Hub as Trainer sees it (`transformers.trainer.hf_api()`): the repo exists, the upload fails after
    `uploaded` of the files went up (the commit is never made)."""

    def __init__(self, fail_create=False):
        self.fail_create, self.calls = fail_create, []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append("create_repo")
        if self.fail_create:
            raise OSError("Temporary failure in name resolution")
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, repo_id, folder_path, **kwargs):
        self.calls.append("upload_folder")
        raise ConnectionError("Connection reset by peer while uploading model.safetensors")


def test_a_failed_push_keeps_the_local_run_and_says_what_was_not_uploaded(tmp_path, monkeypatch):
    import transformers.trainer

    hub = FailingHub()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: hub)
    started = time.perf_counter()
    with pytest.raises(HubPushError) as failure:
        run_dsi_image.main(tiny_args(tmp_path, "--push_to_hub", "True", "--hub_model_id", REPO))
    # Trainer pushes after the final save (that failure is logged, evaluation goes on), the script at its end
    assert hub.calls == ["create_repo", "upload_folder", "upload_folder"]
    message = str(failure.value)
    out = str(tmp_path / "out")
    assert REPO in message and out in message and "Connection reset" in message
    assert "Not uploaded: all" in message and "model.safetensors" in message and "nothing of this one" in message
    assert "\n" not in message
    # everything local is there and loads: the model, its results (evaluation included), the card
    load_dsi_model(out, strict=True)
    results = json.loads((tmp_path / "out" / "all_results.json").read_text())
    assert "eval_hits@1" in results and "train_loss" in results
    assert (tmp_path / "out" / "README.md").exists()
    assert time.perf_counter() - started < 300


def test_a_hub_repo_that_cannot_be_created_stops_the_run_before_training(tmp_path, monkeypatch):
    import transformers.trainer

    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: FailingHub(fail_create=True))
    with pytest.raises(HubPushError, match=f"could not create or reach the Hub repo {REPO}.*name resolution"):
        run_dsi_image.main(tiny_args(tmp_path, "--push_to_hub", "True", "--hub_model_id", REPO))
    assert not (tmp_path / "out" / "model.safetensors").exists()
