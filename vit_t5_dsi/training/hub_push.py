"""What a failed Hub push tells the user: what reached the repo, what did not, and that the local run is intact.

A push (`Trainer.push_to_hub`, `huggingface_hub.upload_folder`) is one commit: the files are uploaded first, and
the commit that makes them the repo's content is created only once all of them are, so a push that fails half
way changes nothing in the repo. The push only reads `output_dir`; the local model, results and checkpoints are
as they were before it.
"""

from __future__ import annotations

import fnmatch
import os

from ..checkpoint.errors import UsageError

# what Trainer.push_to_hub leaves out of its upload (its `ignore_patterns`)
IGNORED = ("_*", "checkpoint-*")


class HubPushError(UsageError):
    """A push to the Hub (or creating its repo) failed; the local output is complete. A `UsageError`, so
    `vit-t5-dsi-train` prints it as one line and exits 2."""


def files_to_push(output_dir: str) -> list[str]:
    """The files a push of `output_dir` uploads (relative paths, sorted)."""
    found = []
    for folder, dirs, files in os.walk(output_dir):
        relative = os.path.relpath(folder, output_dir)
        dirs[:] = [d for d in dirs if not any(fnmatch.fnmatch(d, p) for p in IGNORED)]
        found += [os.path.normpath(os.path.join(relative, f)) for f in files
                  if not any(fnmatch.fnmatch(f, p) for p in IGNORED)]
    return sorted(found)


def push_failed(err: BaseException, repo_id: str | None, output_dir: str) -> HubPushError:
    files = files_to_push(output_dir)
    shown = ", ".join(files[:6]) + (f" and {len(files) - 6} more" if len(files) > 6 else "")
    return HubPushError(
        f"Pushing {output_dir} to the Hub repo {repo_id} failed ({type(err).__name__}: {err}). Not uploaded: all "
        f"{len(files)} files of this push ({shown}); a push is one commit, made only once every file is uploaded, "
        f"so the repo holds what earlier pushes put there and nothing of this one. Nothing local was lost: "
        f"{output_dir} is complete. Push it again with: hf upload {repo_id} {output_dir}")


def repo_failed(err: BaseException, repo_id: str | None) -> HubPushError:
    return HubPushError(
        f"--push_to_hub: could not create or reach the Hub repo {repo_id} ({type(err).__name__}: {err}). Nothing "
        "was trained or uploaded yet. Check the network and HF_TOKEN (or `hf auth login`), or run without "
        "--push_to_hub and upload the output directory later.")


__all__ = ["HubPushError", "files_to_push", "push_failed", "repo_failed"]
