"""A checkpoint folder and how its code reads and writes it safely.

What a checkpoint folder holds: the names of its files (one list, read by every writer, cleaner and checker),
and its code: every module of this folder, copied flat beside the weights.

transformers' remote-code loader (`trust_remote_code=True`) imports a checkpoint's modules from its own folder, so
they may import only each other (relative, flat) besides installed libraries. This folder is exactly that set: what
is here is copied into every checkpoint, and nothing here imports from the rest of the package (a test checks
both). Training-only code (identifier building, data, the trainer) lives outside it and never ships.

Errors (`UsageError`, `CollectionError`) mean "the input is wrong", not "the code is wrong": the command-line scripts
print these as one line and exit with status 2 (argparse's convention for usage errors); anything else keeps its
traceback, because it is a bug worth reporting.

Write files so that a crash or a full disk never leaves a half-written file where a good one was.

`tempfile.mkstemp` creates files readable by their owner only (0600), and so does safetensors >= 0.8 for every
file it writes (it saves through a temporary file and renames it: safetensors issue #782); a checkpoint shared
with a team or served by a web app must keep ordinary permissions, so every file gets what `open()` would have
given a new file (0666 less the umask). Data is flushed to disk before the rename, or a power loss could leave an
empty file behind it.

A save that runs out of space (ENOSPC, or EDQUOT for a quota) raises `DiskFullError`, one line naming the folder,
and leaves what the folder held before as it was: `atomic_write` for one file, `save_directory_atomically` for a
whole `save_pretrained`.

`optional_import` is for what only some features need (timm towers, k-means ids). The import sits in a `try` block on
purpose: transformers scans remote-code files for imports and refuses to load a checkpoint when a module they name is
missing, except for imports inside `try`. So a checkpoint saved with `trust_remote_code` loads without timm or
scikit-learn when it does not use them.
"""

from __future__ import annotations

import errno
import importlib
import os
import shutil
import tempfile
from collections.abc import Callable
from types import ModuleType
from typing import TypeVar


class UsageError(ValueError):
    """A bad flag, a bad flag combination, or a state of the output directory the run refuses to touch."""


class CollectionError(UsageError):
    """Bad input in a collection; the message names the file and the item."""


# Refusals several entry points share (pipeline, retriever, trainer, flags), worded once.
NO_IMAGE_INDEX = ("This model has no image index (image_index.json): it was never trained on a collection, so there is "
                  "nothing to retrieve.")


def cannot_rerank_a_dual_encoder(what: str = "Re-ranking") -> str:
    """`what` (a flag or an argument) asks to re-rank where the model is a dual encoder."""
    return f"{what} re-orders a generative model's top-k: the dual encoder ranks by itself."


def optional_import(module: str, needed_for: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        package = {"sklearn": "scikit-learn"}.get(module.split(".")[0], module.split(".")[0])
        raise ImportError(f"{needed_for} needs {package}: pip install {package}") from err


T = TypeVar("T")

# a save's own folder inside the directory it saves to: same filesystem (a rename, no copy), and the Trainer's
# pushes ignore "_*" if a killed process leaves one behind
STAGING_PREFIX = "_saving-"
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# how libraries that do not raise OSError (safetensors' Rust writer: "I/O error: No space left on device (os
# error 28)") word a full disk or quota
_DISK_FULL_WORDS = {os.strerror(errno.ENOSPC): errno.ENOSPC, os.strerror(errno.EDQUOT): errno.EDQUOT,
                    "StorageFull": errno.ENOSPC, "os error 28": errno.ENOSPC}


class DiskFullError(UsageError, OSError):
    """A save stopped because the disk (or the quota) is full. Scripts print it as one line, as any `UsageError`
    (the fix is outside the code: free space, or save elsewhere); `except OSError` still catches it, with `errno`
    ENOSPC or EDQUOT and `filename` the folder."""

    def __init__(self, folder: str, code: int = errno.ENOSPC, file: str | None = None):
        what = f"the previous {file}, if any, is" if file else "the files already there are"
        super().__init__(f"{folder}: {os.strerror(code).lower()}"
                         f"{f' while writing {file}' if file else ''}; the save stopped and {what} unchanged. "
                         "Free some space (or save somewhere else) and run again.")
        self.errno, self.strerror, self.filename, self.file = code, os.strerror(code), folder, file

    def __str__(self) -> str:
        return self.args[0]

    def __reduce__(self):
        return type(self), (self.filename, self.errno, self.file)


def disk_full_errno(err: BaseException | None) -> int | None:
    """ENOSPC or EDQUOT when `err`, or an exception it was raised from, is a full disk or quota; else None."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
            return err.errno
        text = str(err)
        for words, code in _DISK_FULL_WORDS.items():
            if words in text:
                return code
        err = err.__cause__ or err.__context__
    return None


def disk_full_error(err: BaseException, folder: str | os.PathLike) -> DiskFullError | None:
    """The `DiskFullError` naming `folder` that `err` (raised while saving into it) amounts to, or None.
    `torch.save` reports a full disk as a RuntimeError with no errno ("unexpected pos ..."): such an error counts
    when the filesystem of `folder` has less than 1 MiB left."""
    folder = os.fspath(folder)
    if isinstance(err, DiskFullError) and err.filename == folder:
        return err
    code = disk_full_errno(err)
    if code is None and isinstance(err, (RuntimeError, OSError)):
        existing = os.path.abspath(folder)
        while not os.path.isdir(existing) and os.path.dirname(existing) != existing:
            existing = os.path.dirname(existing)
        try:
            code = errno.ENOSPC if shutil.disk_usage(existing).free < 1 << 20 else None
        except OSError:
            pass
    return None if code is None else DiskFullError(folder, code)


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask(0) would briefly give files that
    another thread creates meanwhile mode 0666)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def ordinary_mode(directory: bool = False) -> int:
    """What `open()` (0666) or `os.makedirs` (0777) give a new file or folder under the current umask."""
    return (0o777 if directory else 0o666) & ~_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> str:
    """Call `write(tmp_path)` on a temporary file beside `path`, fsync it, then rename it over `path`.
    A full disk raises `DiskFullError` naming the folder; `path` keeps its previous content."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        os.close(handle)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, ordinary_mode())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        code = disk_full_errno(err)
        if code is not None and not isinstance(err, DiskFullError):
            raise DiskFullError(directory, code, os.path.basename(path)) from err
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> str:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:  # some filesystems cannot fsync a directory
        if err.errno not in (errno.EINVAL, errno.EBADF, errno.EISDIR):
            raise
    finally:
        os.close(fd)


def _move_into(source: str, target: str) -> None:
    """Rename every entry of folder `source` into folder `target`, replacing files and merging folders."""
    for name in os.listdir(source):
        src, dst = os.path.join(source, name), os.path.join(target, name)
        if os.path.isdir(src) and not os.path.islink(src) and os.path.isdir(dst):
            _move_into(src, dst)
            os.rmdir(src)
        else:
            os.replace(src, dst)


def save_directory_atomically(directory: str | os.PathLike, write: Callable[[str], T]) -> tuple[T, list[str]]:
    """Call `write(folder)` on a folder inside `directory`, then move what it wrote into `directory`.

    Until every file is written and on disk, `directory` is untouched: a save that fails (a full disk above all)
    leaves the previous checkpoint there loadable, and `DiskFullError` names `directory`. The moves are renames
    within one filesystem, which need no space. Every file and folder written gets ordinary permissions (0666 /
    0777 less the umask).

    `write` finds an empty file in its folder for every file `directory` holds, so a writer that removes stale
    files of an earlier save (transformers' old weight shards, an image index's old columns) removes them as it
    would in place: the files it removes are removed from `directory` after the move; the ones it leaves alone
    stay as they were. Returns `write`'s result and the names it wrote (at the top of the folder).
    """
    directory = os.fspath(directory)
    created = not os.path.isdir(directory)
    staging = None
    try:
        os.makedirs(directory, exist_ok=True)
        staging = tempfile.mkdtemp(dir=directory, prefix=STAGING_PREFIX)
        placeholders = {}
        for entry in os.scandir(directory):
            if entry.is_file(follow_symlinks=False):
                path = os.path.join(staging, entry.name)
                open(path, "xb").close()
                placeholders[entry.name] = _identity(path)
        result = write(staging)
        removed = [name for name in placeholders if not os.path.lexists(os.path.join(staging, name))]
        for name, identity in placeholders.items():  # left alone: the file in `directory` stays as it is
            path = os.path.join(staging, name)
            if os.path.lexists(path) and _identity(path) == identity:
                os.unlink(path)
        file_mode, folder_mode = ordinary_mode(), ordinary_mode(directory=True)
        for root, folders, files in os.walk(staging):
            for name in folders:
                os.chmod(os.path.join(root, name), folder_mode)
            for name in files:
                path = os.path.join(root, name)
                if not os.path.islink(path):
                    os.chmod(path, file_mode)
                    _fsync(path)
        names = sorted(os.listdir(staging))
        _move_into(staging, directory)
        os.rmdir(staging)
        for name in removed:
            if os.path.lexists(os.path.join(directory, name)):
                os.unlink(os.path.join(directory, name))
        _fsync(directory)
    except BaseException as err:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if created:  # a folder this save made and could not fill is not left behind empty
            try:
                os.rmdir(directory)
            except OSError:
                pass
        code = disk_full_errno(err)
        if code is not None and not (isinstance(err, DiskFullError) and err.filename == directory):
            raise DiskFullError(directory, code) from err  # named after `directory`, not its staging folder
        raise
    return result, names


def _identity(path: str) -> tuple[int, int, int]:
    stat = os.lstat(path)
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"  # sharded weights
# the image index: the whole index (small collections) or a header naming its columns file
INDEX_FILE_NAME = "image_index.json"
ARRAYS_FILE_PREFIX, ARRAYS_FILE_SUFFIX = "image_index-", ".safetensors"  # per-image columns (larger collections)
EMBEDDINGS_FILE_NAME = "image_embeddings.safetensors"  # the indexed images' dense embeddings (dual encoder)
# rq ids: the frozen codebooks (one (codes, dim) matrix per level, the extra level last), so images added later are
# quantized with the very codes their ids were cut from (`vit_t5_dsi.updates`)
CODEBOOKS_FILE_NAME = "rq_codebooks.safetensors"
# a generative checkpoint's dual encoder (the run's dense stage): ids were cut from it, it re-ranks the beam
DUAL_ENCODER_SUBFOLDER = "dual_encoder"
# what makes a folder a model (not counting the image index's columns files, whose names carry a digest)
MODEL_FILES = (CONFIG_FILE, GENERATION_CONFIG_FILE, WEIGHTS_FILE, WEIGHTS_INDEX_FILE, INDEX_FILE_NAME,
               EMBEDDINGS_FILE_NAME, CODEBOOKS_FILE_NAME)
# a training run's records beside its model (written by the trainer and run_dsi_image.py)
ALL_RESULTS_FILE = "all_results.json"
PROTOCOL_FILE = "protocol.json"
PSEUDO_QUERIES_FILE = "pseudo_queries.jsonl"
UPDATES_FILE = "index_updates.json"  # images added and removed after training (`vit_t5_dsi.updates`), oldest first
RUN_RECORD_FILES = (ALL_RESULTS_FILE, "train_results.json", "eval_results.json", "dense_results.json", PROTOCOL_FILE,
                    "trainer_state.json", PSEUDO_QUERIES_FILE, UPDATES_FILE, "eval_predictions.jsonl",
                    "seen_predictions.jsonl", "index_predictions.jsonl")

CODE_DIRECTORY = os.path.dirname(os.path.abspath(__file__))


def checkpoint_code_files() -> list[str]:
    """The module file names a checkpoint carries (the package marker excluded)."""
    return sorted(name for name in os.listdir(CODE_DIRECTORY) if name.endswith(".py") and name != "__init__.py")


def copy_checkpoint_code(save_directory: str) -> None:
    """Copy every checkpoint module into `save_directory` (transformers copies only the modules that the saved
    classes import; the pipeline and its helpers are not among them)."""
    for name in checkpoint_code_files():
        shutil.copyfile(os.path.join(CODE_DIRECTORY, name), os.path.join(save_directory, name))


__all__ = ["UsageError", "CollectionError", "NO_IMAGE_INDEX", "cannot_rerank_a_dual_encoder", "optional_import",
           "atomic_write", "atomic_write_text", "save_directory_atomically", "ordinary_mode", "disk_full_errno",
           "disk_full_error", "DiskFullError", "DISK_FULL_ERRNOS", "STAGING_PREFIX", "CONFIG_FILE",
           "GENERATION_CONFIG_FILE", "WEIGHTS_FILE", "WEIGHTS_INDEX_FILE", "INDEX_FILE_NAME", "EMBEDDINGS_FILE_NAME",
           "CODEBOOKS_FILE_NAME", "DUAL_ENCODER_SUBFOLDER", "MODEL_FILES", "ALL_RESULTS_FILE", "PROTOCOL_FILE",
           "PSEUDO_QUERIES_FILE", "UPDATES_FILE", "RUN_RECORD_FILES", "CODE_DIRECTORY", "ARRAYS_FILE_PREFIX",
           "ARRAYS_FILE_SUFFIX", "checkpoint_code_files", "copy_checkpoint_code"]
