"""SIGKILL a run of the default recipe (dense stage, then the generative model writing pseudo-queries) at each
named moment of `vit_t5_dsi.training.fault_points`, resume it with `--resume_from_checkpoint latest`, and end with
the uninterrupted run's weights and results. Each moment is killed once here (the run is the tiniest that passes
through all five: 8 dense steps, 12 generative steps, a checkpoint every 4, refreshes at epochs 1 and 2);
`benchmarks/bench_kill_and_resume.py` kills each three times, at different arrivals, through the command line.

The runs are forked from a process that imported the script once (`forked_runs`): on two shared cores the
imports alone take ~20 s a process, which would make the ten runs here cost minutes more."""

import os
import signal

import pytest

import forked_runs
from conftest import assert_same_results, tiny_run_args
from vit_t5_dsi.checkpoint.loading import load_dsi_model
from vit_t5_dsi.training.fault_points import KILL_AT_VARIABLE
from vit_t5_dsi.training.trainer import checkpoint_is_complete

# the default recipe, as small as it goes while still reaching every moment below
KILL_RECIPE = ("--pseudo_query_epochs", "1,2", "--augment", "True", "--per_device_train_batch_size", "64",
               "--per_device_eval_batch_size", "8", "--max_steps", "12", "--save_steps", "4")
KILLS = {  # moment: which arrival is killed (fault_points), and what that is in this run
    "dense_step": 6,  # the dual encoder's step 6 of 8: its checkpoint-4 is the last one
    "pseudo_queries": 2,  # the second refresh (epoch 2, after checkpoint-8), its images captioned, not yet stored
    "checkpoint_save": 5,  # checkpoint-8: weights written, optimizer, trainer state and completeness mark not
    "step": 6,  # between steps 6 and 7 (the last checkpoint is checkpoint-4)
    "evaluation": 5,  # the final evaluation's 5th batch (training done, final model saved)
}


def log_tail(path, lines=40):
    with open(path, encoding="utf-8", errors="replace") as f:
        return "".join(f.readlines()[-lines:])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill_and_resume")
    log = root / "full.log"
    assert forked_runs.run(tiny_run_args(root / "full", root / "data", *KILL_RECIPE), log=log) == 0, log_tail(log)
    return root


def check_checkpoints_after_a_kill(output_dir, args, log):
    """No kill leaves a checkpoint that can be resumed but is incomplete: a complete one loads strictly; an
    incomplete one is refused by --resume_from_checkpoint (and holds the model whole or not at all)."""
    folders = sorted(output_dir.glob("checkpoint-*")) + sorted(output_dir.glob("dual_encoder/checkpoint-*"))
    incomplete = []
    for folder in folders:
        if (folder / "model.safetensors").exists() or checkpoint_is_complete(str(folder)):
            load_dsi_model(str(folder), strict=True)  # the staged save writes the model all at once
        if not checkpoint_is_complete(str(folder)):
            incomplete.append(folder)
    for folder in incomplete:
        if folder.parent == output_dir:
            assert forked_runs.run(args + ["--resume_from_checkpoint", str(folder)], log=log) == 2
            assert "the checkpoint is incomplete" in log_tail(log, 5)
    return incomplete


@pytest.mark.slow
@pytest.mark.parametrize("moment", list(KILLS))
def test_a_run_killed_at_this_moment_resumes_to_the_uninterrupted_results(uninterrupted, tmp_path, moment):
    killed = tmp_path / "killed"
    # the killed run takes the full run's tokenizer: BPE training breaks ties differently in every process
    args = tiny_run_args(killed, uninterrupted / "data", *KILL_RECIPE, "--tokenizer_name_or_path",
                         str(uninterrupted / "full" / "dual_encoder"))
    log = tmp_path / "run.log"
    code = forked_runs.run(args, env={KILL_AT_VARIABLE: f"{moment}:{KILLS[moment]}"}, log=log)
    assert code == -signal.SIGKILL, f"the run was not killed at {moment}:{KILLS[moment]}:\n" + log_tail(log)
    assert not (killed / "eval_results.json").exists()
    incomplete = check_checkpoints_after_a_kill(killed, args, tmp_path / "refused.log")
    if moment == "checkpoint_save":
        assert [folder.name for folder in incomplete] == ["checkpoint-8"]
    code = forked_runs.run(args + ["--resume_from_checkpoint", "latest"], log=log)
    assert code == 0, log_tail(log)
    assert_same_results(uninterrupted / "full", killed)


def test_an_unknown_kill_moment_is_an_error(monkeypatch):
    from vit_t5_dsi.training import fault_points

    monkeypatch.setenv(KILL_AT_VARIABLE, "checkpoint:1")
    with pytest.raises(ValueError, match="no moment 'checkpoint'"):
        fault_points.reached("step")
    monkeypatch.delenv(KILL_AT_VARIABLE)
    fault_points.reached("step")  # unset: nothing happens


def test_latest_is_the_last_complete_checkpoint_and_an_unfinished_start_is_cleared(tmp_path):
    from types import SimpleNamespace

    from vit_t5_dsi.training.resume import resolve_latest_checkpoint
    from vit_t5_dsi.training.trainer import RESUME_STATE_FILE

    def args():
        return SimpleNamespace(output_dir=str(tmp_path), resume_from_checkpoint="latest", process_index=0,
                               world_size=1)

    for step, complete in ((4, True), (8, True), (12, False)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{step}" / RESUME_STATE_FILE).write_text("{}")
    (tmp_path / "pseudo_queries.jsonl").write_text("")
    resolved = args()
    resolve_latest_checkpoint(resolved)
    assert resolved.resume_from_checkpoint == str(tmp_path / "checkpoint-8")  # checkpoint-12 was being written
    assert (tmp_path / "checkpoint-12").exists()  # left for the resumed run to write again
    # killed before its first complete checkpoint: what it left is cleared, the dense stage kept, the run starts
    for step in (4, 8):
        (tmp_path / f"checkpoint-{step}" / RESUME_STATE_FILE).unlink()
    (tmp_path / "dual_encoder").mkdir()
    resolved = args()
    resolve_latest_checkpoint(resolved)
    assert resolved.resume_from_checkpoint is None and os.listdir(tmp_path) == ["dual_encoder"]
    # anything else (an earlier run's results) is not the killed run's: kept, and the output dir check refuses it
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "all_results.json").write_text("{}")
    resolve_latest_checkpoint(args())
    assert sorted(os.listdir(tmp_path)) == ["all_results.json", "checkpoint-4", "dual_encoder"]
