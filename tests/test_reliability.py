"""Reliability promises (docs/reliability.md): file permissions, secrets, full disks.

One tiny training run (module fixture) serves the permission and the secrets checks; the disk-full checks inject
the failure where a real disk would fail, and also fill a real 4 MiB tmpfs when this process may mount one.
"""

import contextlib
import errno
import io
import logging
import os
import shutil
import stat
import subprocess
import tempfile

import pytest
import torch

import run_dsi_image
from conftest import make_trainer, tiny_args, tiny_config
from vit_t5_dsi.identifiers.build import build_image_index
from vit_t5_dsi import ImageIndex, ViTT5DSIForConditionalGeneration, ViTT5DSIProcessor, load_dsi_model
from vit_t5_dsi.checkpoint.checkpoint_io import (STAGING_PREFIX, atomic_write, atomic_write_text, disk_full_errno,
                                                 disk_full_error, DiskFullError, UsageError)

HF_TOKEN = "hf_fakeReliabilityCanary0123456789abcd"
WANDB_KEY = "fakewandbcanary0123456789abcdef012345678"
SECRETS = (HF_TOKEN, WANDB_KEY)


def every_file(*roots):
    for root in roots:
        for folder, _, files in os.walk(root):
            for name in files:
                yield os.path.join(folder, name)


def leaks(paths, texts=()):
    """(where, which secret) for every file or text that holds one of the fake secrets."""
    found = []
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        found += [(path, secret[:8]) for secret in SECRETS if secret.encode() in data]
    for where, text in texts:
        found += [(where, secret[:8]) for secret in SECRETS if secret in text]
    return found


@contextlib.contextmanager
def umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@contextlib.contextmanager
def captured_output(path):
    """Everything a run prints: log records (root and transformers' own logger, which does not propagate), Python
    writes to sys.stdout/stderr, and file descriptors 1 and 2 (C code and subprocesses such as wandb's service)."""
    records, python = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(records)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    loggers = [logging.getLogger(), logging.getLogger("transformers")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)  # what run_dsi_image's basicConfig asks for on the main process
    saved = [os.dup(1), os.dup(2)]
    with open(path, "wb") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
    texts = {}
    try:
        with contextlib.redirect_stdout(python), contextlib.redirect_stderr(python):
            yield texts
    finally:
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)
        for logger, level in zip(loggers, levels):
            logger.removeHandler(handler)
            logger.setLevel(level)
        texts.update({"log records": records.getvalue(), "sys.stdout/stderr": python.getvalue()})
        with open(path, encoding="utf-8", errors="replace") as f:
            texts["file descriptors 1 and 2"] = f.read()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny training run (two steps, a checkpoint after each) with fake secrets in the environment, under umask
    027, reporting to wandb (offline) when it is installed."""
    tmp = tmp_path_factory.mktemp("run")
    try:
        import wandb  # noqa: F401

        report = ["--report_to", "wandb"]
    except ImportError:
        report = []
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {"HF_TOKEN": HF_TOKEN, "HUGGING_FACE_HUB_TOKEN": HF_TOKEN, "WANDB_API_KEY": WANDB_KEY,
                            "WANDB_MODE": "offline", "WANDB_DIR": str(tmp / "wandb"), "WANDB_SILENT": "false",
                            "WANDB_PROJECT": "reliability"}.items():
            mp.setenv(name, value)
        os.makedirs(tmp / "wandb")
        with umask(0o027), captured_output(tmp / "fds.log") as texts:
            run_dsi_image.main(tiny_args(tmp, "--docid_scheme", "naive", "--demo_num_images", "12", "--max_steps",
                                         "2", "--save_strategy", "steps", "--save_steps", "1", "--logging_steps", "1",
                                         *report))
            if report:  # its last files (summary, offline run data) are written when the run finishes
                import wandb

                wandb.finish()
    return tmp, texts


# ----- 7. permissions -----------------------------------------------------------------------------------

def modes(root):
    return {os.path.relpath(path, root): stat.S_IMODE(os.lstat(path).st_mode) for path in every_file(root)}


@pytest.mark.parametrize("mask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_every_file_a_model_and_processor_save_has_ordinary_permissions(tmp_path, tokenizer, mask):
    model = ViTT5DSIForConditionalGeneration(tiny_config())
    model.image_index = build_image_index([f"img{i}" for i in range(5)], tokenizer, "naive")
    model.image_index.embeddings = torch.randn(5, 8)  # one more safetensors file, written by the index
    with umask(mask):
        model.save_pretrained(tmp_path / "out")
        ViTT5DSIProcessor.for_model(model.config, tokenizer).save_pretrained(tmp_path / "out")
    found = modes(tmp_path / "out")
    assert {"model.safetensors", "image_embeddings.safetensors", "processor_config.json"} <= set(found)
    assert {name: oct(mode) for name, mode in found.items() if mode != 0o666 & ~mask} == {}
    assert stat.S_IMODE(os.stat(tmp_path / "out").st_mode) == 0o777 & ~mask
    assert not [name for name in os.listdir(tmp_path / "out") if name.startswith(STAGING_PREFIX)]


def test_every_file_of_a_training_run_and_its_checkpoints_has_ordinary_permissions(run):
    tmp, _ = run
    found = modes(tmp / "out")
    for required in ("model.safetensors", "training_args.bin", "README.md", "checkpoint-1/model.safetensors",
                     "checkpoint-1/optimizer.pt", "checkpoint-1/rng_state.pth", "checkpoint-2/trainer_state.json"):
        assert required in found, sorted(found)
    assert {name: oct(mode) for name, mode in found.items() if mode != 0o640} == {}  # umask 027
    for folder, folders, _ in os.walk(tmp / "out"):
        assert not [name for name in folders if name.startswith(STAGING_PREFIX)], folder


# ----- 8. untrusted files and secrets -------------------------------------------------------------------

def test_no_secret_reaches_any_file_or_the_output_of_a_run(run):
    tmp, texts = run
    files = list(every_file(tmp))
    names = {os.path.relpath(path, tmp) for path in files}
    for required in ("out/README.md", "out/training_args.bin", "out/checkpoint-1/training_args.bin",
                     "out/trainer_state.json", "out/all_results.json"):
        assert required in names, sorted(names)
    assert texts["log records"].strip(), "the run logged nothing: the capture is broken"
    assert leaks(files, texts.items()) == []


def test_a_hub_token_on_the_command_line_is_refused_and_never_echoed(tmp_path, capsys):
    with captured_output(tmp_path / "fds.log") as texts:
        try:
            run_dsi_image.main(tiny_args(tmp_path, "--hub_token", HF_TOKEN, "--max_steps", "1", "--do_eval",
                                         "False", "--demo_num_images", "12", "--docid_scheme", "naive"))
            refused = None
        except UsageError as err:
            refused = str(err)
    captured = capsys.readouterr()
    texts = {**texts, "pytest capture": captured.out + captured.err}
    # refused before anything is written (the token would reach training_args.bin, a pickle of the arguments)
    assert refused is not None and "--hub_token" in refused
    assert leaks(every_file(tmp_path), [*texts.items(), ("the error", refused)]) == []


def test_the_package_and_scripts_never_unpickle_without_a_guard():
    """torch.load only with weights_only=True, np.load never with allow_pickle=True, no pickle/joblib/dill loads:
    a checkpoint or a .npy from someone else must not run code (the Trainer's own loads are its business)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sources = [os.path.join(root, name) for name in os.listdir(root) if name.endswith(".py")]
    for folder in ("vit_t5_dsi", "data_scripts", "benchmarks"):
        sources += [path for path in every_file(os.path.join(root, folder)) if path.endswith(".py")]
    problems = []
    for path in sources:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                code = line.split("#")[0]
                if ("torch.load(" in code and "weights_only=True" not in code) or "allow_pickle=True" in code or \
                        any(word in code for word in ("pickle.load", "import pickle", "joblib.load", "dill.load",
                                                      "cloudpickle")):
                    problems.append(f"{os.path.relpath(path, root)}:{number}: {line.strip()}")
    assert problems == []


# ----- 2. a full disk -----------------------------------------------------------------------------------

def saved_model(tmp_path, tokenizer):
    model = ViTT5DSIForConditionalGeneration(tiny_config())
    model.image_index = build_image_index([f"img{i}" for i in range(5)], tokenizer, "naive")
    model.save_pretrained(tmp_path / "out")
    ViTT5DSIProcessor.for_model(model.config, tokenizer).save_pretrained(tmp_path / "out")
    return model


def snapshot(folder):
    result = {}
    for path in every_file(folder):
        with open(path, "rb") as f:
            result[os.path.relpath(path, folder)] = f.read()
    return result


def assert_previous_save_intact(folder, before, model):
    assert snapshot(folder) == before
    loaded = load_dsi_model(str(folder), strict=True)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, msg=name)
    assert list(loaded.image_index.keys) == list(model.image_index.keys)
    assert ViTT5DSIProcessor.from_pretrained(str(folder)).tokenizer is not None


def assert_one_line_naming(err, folder):
    message = str(err)
    assert isinstance(err, UsageError) and isinstance(err, OSError) and err.errno == errno.ENOSPC
    assert message.startswith(f"{folder}: no space left on device") and "\n" not in message, message
    assert err.filename == str(folder)


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def half_written_then_no_space(path):
    with open(path, "wb") as f:
        f.write(b"\0" * 1000)
    no_space()


@pytest.mark.parametrize("where", ["weights", "config", "image index", "safetensors' own error"])
def test_a_model_save_that_hits_a_full_disk_names_the_folder_and_keeps_the_previous_save(tmp_path, tokenizer,
                                                                                        monkeypatch, where):
    import safetensors
    import transformers.modeling_utils as modeling_utils
    from transformers import PretrainedConfig

    model = saved_model(tmp_path, tokenizer)
    before = snapshot(tmp_path / "out")
    if where == "weights":
        monkeypatch.setattr(modeling_utils, "safe_save_file",
                            lambda tensors, path, **kw: half_written_then_no_space(path))
    elif where == "config":
        monkeypatch.setattr(PretrainedConfig, "to_json_file", lambda self, path, *a, **kw:
                            half_written_then_no_space(path))
    elif where == "image index":  # the index's last file, after the weights are written
        real = atomic_write

        def failing(path, write):
            return no_space() if str(path).endswith("image_index.json") else real(path, write)

        monkeypatch.setattr("vit_t5_dsi.checkpoint.image_index_files.atomic_write", failing, raising=False)
        monkeypatch.setattr("vit_t5_dsi.checkpoint.image_index_files.atomic_write_text", lambda path, text: failing(path, None))
    else:  # what safetensors' Rust writer raises: not an OSError, the errno only in its text
        def rust_error(tensors, path, **kw):
            raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device "
                                              "(os error 28)")

        monkeypatch.setattr(modeling_utils, "safe_save_file", rust_error)
    changed = ViTT5DSIForConditionalGeneration(tiny_config())
    changed.image_index = build_image_index([f"other{i}" for i in range(7)], tokenizer, "naive")
    with pytest.raises(DiskFullError) as caught:
        changed.save_pretrained(tmp_path / "out")
    assert_one_line_naming(caught.value, tmp_path / "out")
    monkeypatch.undo()
    assert_previous_save_intact(tmp_path / "out", before, model)


def test_a_processor_save_that_hits_a_full_disk_keeps_the_previous_files(tmp_path, tokenizer, monkeypatch):
    model = saved_model(tmp_path, tokenizer)
    before = snapshot(tmp_path / "out")
    processor = ViTT5DSIProcessor.for_model(model.config, tokenizer)
    monkeypatch.setattr(type(processor.tokenizer), "save_pretrained", lambda self, folder, *a, **kw:
                        half_written_then_no_space(os.path.join(folder, "tokenizer.json")))
    with pytest.raises(DiskFullError) as caught:
        processor.save_pretrained(tmp_path / "out")
    assert_one_line_naming(caught.value, tmp_path / "out")
    monkeypatch.undo()
    assert_previous_save_intact(tmp_path / "out", before, model)


def test_a_first_save_that_hits_a_full_disk_leaves_no_folder_behind(tmp_path, monkeypatch):
    import transformers.modeling_utils as modeling_utils

    monkeypatch.setattr(modeling_utils, "safe_save_file", lambda tensors, path, **kw: half_written_then_no_space(path))
    with pytest.raises(DiskFullError):
        ViTT5DSIForConditionalGeneration(tiny_config()).save_pretrained(tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_atomic_write_on_a_full_disk_names_the_folder_and_keeps_the_previous_file(tmp_path, monkeypatch):
    atomic_write_text(tmp_path / "state.json", '{"step": 1}')
    with pytest.raises(DiskFullError) as caught:
        atomic_write(tmp_path / "state.json", half_written_then_no_space)
    assert_one_line_naming(caught.value, tmp_path)
    assert "state.json" in str(caught.value)
    # a full disk found only by fsync (delayed allocation, NFS) is the same error
    monkeypatch.setattr("vit_t5_dsi.checkpoint.checkpoint_io.os.fsync", no_space)
    with pytest.raises(DiskFullError):
        atomic_write_text(tmp_path / "state.json", '{"step": 2}')
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["state.json"] and (tmp_path / "state.json").read_text() == '{"step": 1}'
    # errors that are not a full disk stay what they were
    with pytest.raises(PermissionError):
        atomic_write(tmp_path / "state.json", lambda tmp: (_ for _ in ()).throw(PermissionError("read-only")))
    assert disk_full_errno(RuntimeError("wrapped")) is None
    wrapped = RuntimeError("wrapped")
    wrapped.__cause__ = OSError(errno.EDQUOT, "quota")
    assert disk_full_errno(wrapped) == errno.EDQUOT
    assert disk_full_error(RuntimeError("unexpected pos 576 vs 534"), tmp_path) is None  # space left: a real bug


def test_the_script_prints_a_full_disk_as_one_line(tmp_path, monkeypatch, capsys):
    def main():
        raise DiskFullError(str(tmp_path / "out" / "checkpoint-4"))

    monkeypatch.setattr(run_dsi_image, "main", main)
    with pytest.raises(SystemExit) as caught:
        run_dsi_image.cli()
    assert caught.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"{tmp_path / 'out' / 'checkpoint-4'}: no space left on device" in lines[0], lines


def test_a_checkpoint_that_hits_a_full_disk_stops_training_and_the_previous_checkpoint_still_loads(
        tmp_path, splits, tokenizer, monkeypatch):  # noqa: F811
    import transformers.modeling_utils as modeling_utils

    real = modeling_utils.safe_save_file
    calls = []

    def full_on_the_second_save(tensors, path, **kwargs):
        calls.append(path)
        return real(tensors, path, **kwargs) if len(calls) == 1 else half_written_then_no_space(path)

    monkeypatch.setattr(modeling_utils, "safe_save_file", full_on_the_second_save)
    trainer = make_trainer(tmp_path, splits, tokenizer, "cross_attention", max_steps=2, save_strategy="steps",
                           save_steps=1, per_device_train_batch_size=4)
    with pytest.raises(DiskFullError) as caught:
        trainer.train()
    assert_one_line_naming(caught.value, tmp_path / "out" / "checkpoint-2")
    monkeypatch.undo()
    previous = tmp_path / "out" / "checkpoint-1"
    assert (previous / "trainer_state.json").exists() and (previous / "optimizer.pt").exists()
    assert load_dsi_model(str(previous), strict=True).image_index is not None
    # the Trainer made checkpoint-2 before the model save failed; nothing of the failed save is in it (an empty
    # folder is left: Trainer's get_last_checkpoint would pick it; see docs/reliability.md)
    assert not (tmp_path / "out" / "checkpoint-2").exists() or os.listdir(tmp_path / "out" / "checkpoint-2") == []


@pytest.fixture
def tiny_tmpfs():
    """A real 4 MiB tmpfs. Mounting needs root (CAP_SYS_ADMIN) and a kernel that allows it in this container;
    elsewhere (most CI runners, non-root users) this test skips: the injected-failure tests above cover the code."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a real full disk needs root to mount a tmpfs")
    folder = tempfile.mkdtemp(prefix="vit_t5_dsi_tmpfs_")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", folder], capture_output=True,
                            text=True)
    if result.returncode != 0:
        os.rmdir(folder)
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", folder], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", folder], capture_output=True)
        os.rmdir(folder)


def fill(folder, leave):
    """Fill the filesystem of `folder` until `leave` bytes are free (a new file each time)."""
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    handle, _ = tempfile.mkstemp(dir=folder, prefix="filler-")
    try:
        os.write(handle, b"\0" * max(0, free - leave))
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
    finally:
        os.close(handle)


def test_a_real_full_disk(tiny_tmpfs, tokenizer):
    root = tiny_tmpfs
    model = ViTT5DSIForConditionalGeneration(tiny_config())
    model.image_index = build_image_index([f"img{i}" for i in range(5)], tokenizer, "naive")
    out = os.path.join(root, "out")
    model.save_pretrained(out)
    ViTT5DSIProcessor.for_model(model.config, tokenizer).save_pretrained(out)
    before = snapshot(out)
    fill(root, leave=64 * 1024)  # room for the small files, not for the weights
    with pytest.raises(DiskFullError) as caught:
        model.save_pretrained(out)
    assert_one_line_naming(caught.value, out)
    assert_previous_save_intact(out, before, model)
    free = os.statvfs(root).f_bavail * os.statvfs(root).f_frsize
    assert free >= 48 * 1024, "the failed save left its partial files behind"
    fill(root, leave=0)  # now not even the index fits
    with pytest.raises(DiskFullError) as caught:
        atomic_write_text(os.path.join(out, "image_index.json"), "x" * 100_000)
    assert_one_line_naming(caught.value, out)
    assert_previous_save_intact(out, before, model)
    # torch.save (the Trainer's optimizer.pt) says only "unexpected pos": the free space tells
    with pytest.raises(RuntimeError) as caught:
        torch.save({"state": torch.zeros(100_000)}, os.path.join(root, "optimizer.pt"))
    assert_one_line_naming(disk_full_error(caught.value, out), out)
