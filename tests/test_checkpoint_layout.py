"""What a checkpoint holds, who writes it, and how it loads: every directory is complete, pushes included."""

import concurrent.futures
import os
import shutil
import stat
import subprocess
import sys

import pytest
import torch

import run_dsi_image
from conftest import tiny_args, tiny_config
from vit_t5_dsi.identifiers.build import build_image_index
from vit_t5_dsi import DSIRetriever, ImageIndex, ViTT5DSIForConditionalGeneration, load_dsi_model

MODEL_FILES = {"model.safetensors", "config.json", "image_index.json", "modeling_vit_t5_dsi.py",
               "configuration_vit_t5_dsi.py", "processing_vit_t5_dsi.py", "processor_config.json", "tokenizer.json"}


class FakeHub:
    """Records what would reach the Hub: folder uploads (copied at call time) and commits."""

    def __init__(self, snapshots_dir):
        self.snapshots_dir, self.uploads, self.commits = snapshots_dir, [], []

    def create_repo(self, repo_id, **kwargs):
        return type("Url", (), {"repo_id": repo_id})()

    def create_branch(self, **kwargs):
        pass

    def upload_folder(self, repo_id, folder_path, path_in_repo=None, run_as_future=False, **kwargs):
        snapshot = os.path.join(self.snapshots_dir, f"upload-{len(self.uploads)}")
        shutil.copytree(folder_path, snapshot, ignore=shutil.ignore_patterns("checkpoint-*", "_*"))
        self.uploads.append((path_in_repo, snapshot, kwargs.get("commit_message")))
        if run_as_future:
            future = concurrent.futures.Future()
            future.set_result(None)
            return future
        return None

    def create_commit(self, repo_id, operations, **kwargs):
        self.commits.append((repo_id, sorted(op.path_in_repo for op in operations)))


def test_a_mid_training_hub_push_is_a_complete_checkpoint(tmp_path, monkeypatch):
    import transformers.trainer as trainer_module

    hub = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(trainer_module, "hf_api", lambda: hub)
    run_dsi_image.main(tiny_args(tmp_path, "--push_to_hub", "True", "--hub_model_id", "someone/dsi",
                                 "--hub_strategy", "every_save", "--save_strategy", "steps", "--save_steps", "2",
                                 "--max_steps", "4", "--do_eval", "False"))
    mid_training = [snapshot for _, snapshot, message in hub.uploads if "step 2" in (message or "")]
    assert mid_training, [message for _, _, message in hub.uploads]
    assert MODEL_FILES <= set(os.listdir(mid_training[0])), sorted(os.listdir(mid_training[0]))
    hits = DSIRetriever.from_pretrained(mid_training[0], device="cpu").retrieve(["a red circle"], top_k=3)[0]
    assert len(hits) == 3


def test_save_pretrained_push_to_hub_uploads_the_index(tmp_path, tokenizer, monkeypatch):
    import transformers.utils.hub as hub_module

    hub = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(hub_module, "hf_api", lambda: hub)
    model = ViTT5DSIForConditionalGeneration(tiny_config())
    model.image_index = build_image_index([f"img{i}" for i in range(5)], tokenizer, "naive")
    model.save_pretrained(tmp_path / "out", push_to_hub=True, repo_id="someone/dsi")
    assert hub.commits and hub.commits[-1][0] == "someone/dsi"
    assert {"image_index.json", "model.safetensors", "config.json"} <= set(hub.commits[-1][1])


REMOTE_LOAD = """
import sys
blocked = ("timm", "sklearn", "vit_t5_dsi")
for name in blocked:
    sys.modules[name] = None  # any import of these raises ImportError, as when they are not installed
import torch
from transformers import AutoModelForSeq2SeqLM, AutoProcessor
path = sys.argv[1]
model = AutoModelForSeq2SeqLM.from_pretrained(path, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
inputs = processor(text=["a red circle"])
index = model.image_index
out = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], num_beams=3,
                     num_return_sequences=3, max_new_tokens=index.max_id_length,
                     logits_processor=[index.logits_processor()])
positions = index.decode(out)
assert (positions >= 0).all() and len(set(positions.tolist())) == 3, positions
assert all(sys.modules[name] is None for name in blocked)
print("OK", type(model).__name__, type(processor).__name__, len(index))
"""


def test_a_remote_code_checkpoint_loads_without_timm_or_scikit_learn(tmp_path):
    run_dsi_image.main(tiny_args(tmp_path, "--max_steps", "2", "--do_eval", "False"))  # semantic ids (k-means)
    script = tmp_path / "load.py"
    script.write_text(REMOTE_LOAD)
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "out")], capture_output=True, text=True,
                            cwd=tmp_path, env=os.environ.copy(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK ViTT5DSIForConditionalGeneration ViTT5DSIProcessor 40" in result.stdout


# ----- loading the index ------------------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path, tokenizer):
    model = ViTT5DSIForConditionalGeneration(tiny_config())
    model.image_index = build_image_index([f"img{i}" for i in range(5)], tokenizer, "naive")
    model.save_pretrained(tmp_path / "repo" / "sub")
    return tmp_path / "repo"


def test_a_corrupt_index_is_an_error_naming_the_file(saved):
    (saved / "sub" / "image_index.json").write_text('{"keys": [')
    with pytest.raises(ValueError, match="image_index.json: the image index is not valid JSON"):
        load_dsi_model(str(saved / "sub"))


def test_subfolder_reaches_the_index(saved):
    assert load_dsi_model(str(saved), subfolder="sub").image_index.keys == [f"img{i}" for i in range(5)]
    assert ImageIndex.from_pretrained(str(saved), subfolder="sub") is not None
    assert ImageIndex.from_pretrained(str(saved)) is None  # only a missing file means "no index"


def test_an_unreachable_hub_repo_is_an_error_not_a_missing_index():
    with pytest.raises(OSError):
        ImageIndex.from_pretrained("someone-who-does-not-exist/no-such-repo")


def test_atomic_writes_keep_ordinary_permissions_and_reach_the_disk_before_the_rename(tmp_path, tokenizer,
                                                                                     monkeypatch):
    import vit_t5_dsi.checkpoint.checkpoint_io as checkpoint_io

    events = []
    real_fsync, real_replace = checkpoint_io.os.fsync, checkpoint_io.os.replace
    monkeypatch.setattr(checkpoint_io.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(checkpoint_io.os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    old_mask = os.umask(0o022)
    try:
        index = build_image_index([f"img{i}" for i in range(5)], tokenizer, "naive", )
        index.embeddings = torch.randn(5, 8)
        index.save(tmp_path)
    finally:
        os.umask(old_mask)
    for name in ("image_index.json", "image_embeddings.safetensors"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644, name
    assert events == ["fsync", "replace", "fsync", "replace"]
    loaded = ImageIndex.load(tmp_path)
    torch.testing.assert_close(loaded.embeddings, index.embeddings)
