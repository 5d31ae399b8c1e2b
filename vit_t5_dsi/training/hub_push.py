"""What a failed Hub push tells the user: what reached the repo, what did not, and that the local run is intact.

A push (`Trainer.push_to_hub`, `huggingface_hub.upload_folder`) is one commit: the files are uploaded first, and
the commit that makes them the repo's content is created only once all of them are, so a push that fails half
way changes nothing in the repo. The push only reads `output_dir`; the local model, results and checkpoints are
as they were before it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os

from ..checkpoint.checkpoint_io import UsageError

logger = logging.getLogger(__name__)

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


class HubPushMessages:
    """Trainer's Hub methods with messages (a mixin before `Trainer`). `Trainer.save_model` pushes when
    --push_to_hub is on, right after the final save and before evaluation; a failure there is logged and the run
    goes on (evaluation, results, card), since the script pushes again at its end, where a failure stops the run
    with `HubPushError`."""

    _push_deferred = False

    @contextlib.contextmanager
    def push_deferred(self, deferred: bool = True):
        before, self._push_deferred = self._push_deferred, deferred
        try:
            yield
        finally:
            self._push_deferred = before

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """A repo that cannot be created or reached stops the run before training, with a message."""
        try:
            super().init_hf_repo(token, private)
        except Exception as err:
            raise repo_failed(err, self.args.hub_model_id or os.path.basename(os.path.abspath(self.args.output_dir))
                              ) from err

    def push_to_hub(self, *args, **kwargs):
        """A push that fails raises `HubPushError`, saying what was and was not uploaded."""
        try:
            return super().push_to_hub(*args, **kwargs)
        except Exception as err:
            if not self.is_world_process_zero():
                raise
            failure = push_failed(err, getattr(self, "hub_model_id", None) or self.args.hub_model_id,
                                  self.args.output_dir)
            if self._push_deferred:
                logger.error("%s The run goes on; the push is tried again at its end.", failure)
                return None
            raise failure from err


__all__ = ["HubPushMessages", "HubPushError", "files_to_push", "push_failed", "repo_failed"]
