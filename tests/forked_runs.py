"""Runs of run_dsi_image.py forked from a server process that imported it once (not a test module).

On this project's two shared cores importing torch, transformers and the package takes about 20 s; a run forked
from a process that has imported them and run nothing starts at once. That is what lets the kill-and-resume
suite kill five runs and resume each in a few minutes. A forked run is a process of its own, killed and resumed
like any other, and runs `run_dsi_image.cli()` with the same arguments as the command line would;
`benchmarks/bench_kill_and_resume.py` runs the same trials through `python run_dsi_image.py`.
"""

from __future__ import annotations

import multiprocessing
import os
import sys

_context = None


def _server():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(["run_dsi_image", "forked_runs"])
    return _context


def _cli(argv: list[str], env: dict[str, str], log: str) -> None:
    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.argv = ["run_dsi_image.py", *argv]
    import run_dsi_image

    run_dsi_image.cli()


def start_run(argv, env: dict[str, str] | None = None, log: str = os.devnull):
    """`run_dsi_image.py ARGV` with `env` added to the environment, output appended to `log`; a started Process."""
    process = _server().Process(target=_cli, args=([str(a) for a in argv], dict(env or {}), str(log)))
    process.start()
    return process


def run(argv, env: dict[str, str] | None = None, log: str = os.devnull, timeout: float = 900) -> int:
    """The exit code of `run_dsi_image.py ARGV` (negative: killed by that signal, e.g. -9 for SIGKILL)."""
    process = start_run(argv, env, log)
    process.join(timeout)
    if process.exitcode is None:
        process.kill()
        process.join()
        raise TimeoutError(f"run_dsi_image.py {' '.join(map(str, argv))} ran over {timeout} s (log: {log})")
    return process.exitcode
