#!/usr/bin/env python
"""Kill a run of the default recipe with SIGKILL at five moments, three times each, resume every killed run with
`--resume_from_checkpoint latest`, and compare it with the same run uninterrupted.

Every run is the command line itself (`python run_dsi_image.py ...`); the kill is `VIT_T5_DSI_KILL_AT=moment:N`
(`vit_t5_dsi/training/fault_points.py`: the process SIGKILLs itself the Nth time it reaches the moment). The run is
the tiniest that reaches all five moments: 40 demo scenes, a dense stage of 8 steps, 12 generative steps with a
checkpoint every 4, pseudo-queries written at epochs 1 and 2. The three trials of a moment kill at three different
arrivals (e.g. checkpoint-4 before its model is written, checkpoint-4 before its completeness mark, checkpoint-8
after its weights). After each kill, every checkpoint left must either be complete and load strictly, or be
refused by --resume_from_checkpoint. A trial passes when the resumed run's final weights are bit for bit the
uninterrupted run's and all_results.json equal on every key but wall-clock figures and train_loss (a float sum
over the same per-step losses grouped differently: within 1e-6 relative).

    python benchmarks/bench_kill_and_resume.py                       # 5 moments x 3 trials (30 runs + 1)
    python benchmarks/bench_kill_and_resume.py --moments step --trials 1 --workdir /tmp/kills
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from vit_t5_dsi.checkpoint.loading import load_dsi_model  # noqa: E402
from vit_t5_dsi.training.dense_stage import last_checkpoint  # noqa: E402
from vit_t5_dsi.training.fault_points import KILL_AT_VARIABLE  # noqa: E402
from vit_t5_dsi.training.trainer import checkpoint_is_complete  # noqa: E402

TIMING_SUFFIXES = ("_runtime", "_samples_per_second", "_steps_per_second")
TRAIN_LOSS_TOLERANCE = 1e-6
RECIPE = ["--demo_num_images", "40", "--per_device_train_batch_size", "64", "--per_device_eval_batch_size", "8",
          "--disable_tqdm", "True", "--semantic_max_leaf_size", "8", "--semantic_num_clusters", "4",
          "--tokenizer_vocab_size", "200", "--logging_steps", "5", "--save_strategy", "steps", "--save_total_limit",
          "20", "--seed", "7", "--use_cpu", "True", "--pseudo_query_epochs", "1,2", "--augment", "True",
          "--max_steps", "12", "--save_steps", "4"]
TRIALS = {  # moment: the arrivals killed, one per trial
    "dense_step": (2, 5, 7),  # dense step 2 (no checkpoint yet), 5 and 7 (after its checkpoint-4)
    "pseudo_queries": (1, 2, 1),  # the first refresh (epoch 1), the second (epoch 2), the first again
    "checkpoint_save": (1, 3, 5),  # checkpoint-4 before the model, checkpoint-4 before its mark, checkpoint-8
    "step": (2, 6, 11),  # between steps: before any checkpoint, after checkpoint-4, after checkpoint-8
    "evaluation": (1, 5, 12),  # the final evaluation's 1st, 5th and last batch
}


def run(args, log, env=None, timeout=1800) -> tuple[int, float]:
    started = time.perf_counter()
    with open(log, "a", encoding="utf-8") as out:
        code = subprocess.run([sys.executable, os.path.join(ROOT, "run_dsi_image.py"), *args], cwd=ROOT,
                              stdout=out, stderr=subprocess.STDOUT, timeout=timeout,
                              env={**os.environ, **(env or {})}).returncode
    return code, time.perf_counter() - started


def checkpoints_after_kill(output_dir, args, log) -> tuple[int, int, list[str]]:
    """(complete checkpoints, incomplete ones, problems): complete ones must load strictly, incomplete ones be
    refused by --resume_from_checkpoint."""
    problems, complete, incomplete = [], 0, 0
    folders = [os.path.join(d, name) for d in (output_dir, os.path.join(output_dir, "dual_encoder"))
               if os.path.isdir(d) for name in sorted(os.listdir(d)) if name.startswith("checkpoint-")]
    for folder in folders:
        if checkpoint_is_complete(folder) or os.path.isfile(os.path.join(folder, "model.safetensors")):
            try:
                load_dsi_model(folder, strict=True)
            except Exception as err:  # noqa: BLE001 - reported in the table
                problems.append(f"{folder} does not load: {err}")
        if checkpoint_is_complete(folder):
            complete += 1
            continue
        incomplete += 1
        if os.path.dirname(folder) == output_dir:
            code, _ = run(args + ["--resume_from_checkpoint", folder], log)
            if code != 2:
                problems.append(f"resuming from the incomplete {folder} exited {code}, not 2")
    return complete, incomplete, problems


def compare(full, resumed) -> tuple[int, list[str], float]:
    """(keys compared, differences, train_loss relative difference)."""
    a = json.load(open(os.path.join(full, "all_results.json")))
    b = json.load(open(os.path.join(resumed, "all_results.json")))
    differences = [f"keys {sorted(set(a) ^ set(b))}"] if set(a) != set(b) else []
    compared, loss_diff = 0, 0.0
    for key in set(a) & set(b):
        if key.endswith(TIMING_SUFFIXES):
            continue
        compared += 1
        if key.endswith("train_loss"):
            diff = abs(a[key] - b[key]) / max(abs(a[key]), 1e-12)
            loss_diff = max(loss_diff, diff)
            if diff > TRAIN_LOSS_TOLERANCE:
                differences.append(f"{key} {a[key]} != {b[key]}")
        elif a[key] != b[key]:
            differences.append(f"{key} {a[key]} != {b[key]}")
    wa = load_file(os.path.join(full, "model.safetensors"))
    wb = load_file(os.path.join(resumed, "model.safetensors"))
    if set(wa) != set(wb) or not all(torch.equal(wa[k], wb[k]) for k in wa):
        differences.append("model.safetensors differs")
    for name in ("pseudo_queries.jsonl",):
        pa, pb = os.path.join(full, name), os.path.join(resumed, name)
        if os.path.exists(pa) and (not os.path.exists(pb) or open(pa).read() != open(pb).read()):
            differences.append(f"{name} differs")
    return compared, differences, loss_diff


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--moments", nargs="+", default=list(TRIALS), choices=list(TRIALS))
    parser.add_argument("--trials", type=int, default=3, help="Trials per moment (at most 3).")
    parser.add_argument("--workdir", default=None, help="Keep the runs here (default: a temporary folder).")
    args = parser.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="bench_kill_")
    os.makedirs(work, exist_ok=True)
    data, full = os.path.join(work, "data"), os.path.join(work, "full")
    shutil.rmtree(full, ignore_errors=True)
    code, full_seconds = run(["--output_dir", full, "--demo_dir", data, *RECIPE], os.path.join(work, "full.log"))
    if code != 0:
        print(f"the uninterrupted run failed ({code}); see {work}/full.log")
        return 1
    print(f"uninterrupted run: {full_seconds:.0f} s ({work})", flush=True)
    rows, passed = [], 0
    header = ("moment", "arrival", "exit", "ckpts left (complete/incomplete)", "resumed from", "keys compared",
              "differences", "train_loss rel. diff", "weights", "killed after s", "resume s", "result")
    for moment in args.moments:
        for trial, arrival in enumerate(TRIALS[moment][:args.trials], 1):
            out = os.path.join(work, f"{moment}-{trial}")
            shutil.rmtree(out, ignore_errors=True)
            log = out + ".log"
            if os.path.exists(log):
                os.unlink(log)
            run_args = ["--output_dir", out, "--demo_dir", data, *RECIPE, "--tokenizer_name_or_path",
                        os.path.join(full, "dual_encoder")]  # BPE training breaks ties per process
            code, killed_seconds = run(run_args, log, {KILL_AT_VARIABLE: f"{moment}:{arrival}"})
            complete, incomplete, problems = checkpoints_after_kill(out, run_args, log)
            with open(log, "a") as f:
                f.write("\n===== resume =====\n")
            dense = last_checkpoint(os.path.join(out, "dual_encoder"))  # what `latest` resolves to
            resumed_from = (last_checkpoint(out) or (f"dual_encoder/{os.path.basename(dense)}" if dense else None)
                            or "start")
            resumed_code, resume_seconds = run(run_args + ["--resume_from_checkpoint", "latest"], log)
            if resumed_code == 0:
                compared, differences, loss_diff = compare(full, out)
            else:
                compared, differences, loss_diff = 0, [f"resume exited {resumed_code}"], float("nan")
            ok = code == -9 and not problems and not differences
            passed += ok
            rows.append((moment, str(arrival), str(code), f"{complete}/{incomplete}", resumed_from.replace(out + "/", ""),
                         str(compared), "; ".join(problems + differences) or "none", f"{loss_diff:.1e}",
                         "identical" if not any("model" in d for d in differences) and resumed_code == 0 else "DIFFER",
                         f"{killed_seconds:.0f}", f"{resume_seconds:.0f}", "pass" if ok else "FAIL"))
            print(" | ".join(rows[-1]), flush=True)
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\n{passed} of {len(rows)} trials resumed to the uninterrupted run's weights and results "
          f"(uninterrupted run {full_seconds:.0f} s).")
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
