"""Failures outside the run's own code: a Hub push that fails, one process of a DDP run that dies."""

import json
import os
import signal
import subprocess
import time

import pytest

import run_dsi_image
from conftest import ROOT, accelerate_launcher, tiny_args
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


# ----- one process of a DDP run dies or hangs ------------------------------------------------------------------
DDP_TIMEOUT = 10


def ddp_run(tmp_path, port):
    """A 2-process CPU run (gloo) under accelerate launch, long enough to be caught training."""
    args = tiny_args(tmp_path, "--max_steps", "100000", "--logging_steps", "1", "--use_cpu", "True",
                     "--ddp_timeout", str(DDP_TIMEOUT))
    launcher = accelerate_launcher(port=port, script=False)
    log = open(tmp_path / "run.log", "w")
    process = subprocess.Popen(launcher + [os.path.join(ROOT, "run_dsi_image.py"), *args], cwd=ROOT, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 400
    while "'loss'" not in (tmp_path / "run.log").read_text() and time.monotonic() < deadline:
        assert process.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
        time.sleep(0.5)
    ranks = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = dict(e.split(b"=", 1) for e in f.read().split(b"\0") if b"=" in e)
        except OSError:
            continue
        if parent == process.pid and b"RANK" in environ:
            ranks[int(environ[b"RANK"])] = int(pid)
    assert sorted(ranks) == [0, 1], ranks
    return process, ranks


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_when_one_ddp_process_is_killed_the_run_stops_within_seconds(tmp_path):
    process, ranks = ddp_run(tmp_path, 29571)
    try:
        os.kill(ranks[1], signal.SIGKILL)
        started = time.monotonic()
        code = process.wait(timeout=120)
        assert code != 0 and time.monotonic() - started < 60
        assert not alive(ranks[0])
        log = (tmp_path / "run.log").read_text()
        assert "rank      : 1" in log and "SIGKILL" in log  # the launcher names the process that died
    finally:
        os.killpg(process.pid, signal.SIGKILL) if process.poll() is None else None
        for pid in ranks.values():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_when_one_ddp_process_hangs_the_other_gives_up_after_ddp_timeout(tmp_path):
    """SIGSTOP: the process is there but never answers; the other one's next collective times out after
    --ddp_timeout (10 s here; transformers left gloo at torch's 30 minutes) and it exits with a message."""
    process, ranks = ddp_run(tmp_path, 29572)
    try:
        os.kill(ranks[1], signal.SIGSTOP)
        started = time.monotonic()
        deadline = started + DDP_TIMEOUT + 60
        while alive(ranks[0]) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not alive(ranks[0]), "rank 0 still waits"
        assert time.monotonic() - started >= DDP_TIMEOUT - 1
        os.kill(ranks[1], signal.SIGCONT)  # so it takes the launcher's SIGTERM now, not after its grace period
        code = process.wait(timeout=120)
        assert code != 0
        log = (tmp_path / "run.log").read_text()
        assert "another process of this run stopped answering (a collective waited --ddp_timeout 10 s)" in log
    finally:
        for pid in ranks.values():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
