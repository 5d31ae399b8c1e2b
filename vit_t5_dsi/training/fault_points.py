"""Named moments of a training run at which the kill-and-resume tests stop it with SIGKILL (off unless asked).

    VIT_T5_DSI_KILL_AT=checkpoint_save:3 python run_dsi_image.py ...

kills the process, with SIGKILL sent to itself, the 3rd time it reaches `checkpoint_save` (`:N` left out: the 1st
time). A SIGKILL cannot be caught, so this is the same stop as the OOM killer's or a scheduler's, at a moment a
test can name instead of guess. With the variable unset (every real run), `reached` reads one environment
variable and returns. The moments (the dense stage's own ones start with `dense_`):

- `step` / `dense_step`: after an optimizer step, before the checks for logging and saving (between steps);
- `checkpoint_save` / `dense_checkpoint_save`: inside a checkpoint save: before the model is written, after it
  (optimizer and trainer state not yet), and after Trainer's files, before the completeness mark;
- `pseudo_queries`: while pseudo-queries are written, after each batch of images is captioned;
- `evaluation` / `dense_evaluation`: after each evaluation batch is ranked.
"""

from __future__ import annotations

import os
import signal

KILL_AT_VARIABLE = "VIT_T5_DSI_KILL_AT"
MOMENTS = ("step", "dense_step", "checkpoint_save", "dense_checkpoint_save", "pseudo_queries", "evaluation",
           "dense_evaluation")
_arrivals: dict[str, int] = {}


def reached(moment: str) -> None:
    """Count an arrival at `moment`; SIGKILL this process if VIT_T5_DSI_KILL_AT names this arrival."""
    spec = os.environ.get(KILL_AT_VARIABLE)
    if not spec:
        return
    name, _, count = spec.partition(":")
    if name not in MOMENTS:
        raise ValueError(f"{KILL_AT_VARIABLE}={spec}: no moment {name!r} (one of {', '.join(MOMENTS)}).")
    if name != moment:
        return
    _arrivals[moment] = _arrivals.get(moment, 0) + 1
    if _arrivals[moment] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)


__all__ = ["reached", "KILL_AT_VARIABLE", "MOMENTS"]
