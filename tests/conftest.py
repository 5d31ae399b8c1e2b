"""Offline, tiny, deterministic fixtures shared by the tests."""

import os
import shutil
import tempfile

import pytest

# A temporary HF_HOME, set before anything imports transformers or datasets: both fix their cache paths (remote-code
# modules included) at import, so setting it later would split this process and its subprocesses across two caches.
_HF_HOME = tempfile.mkdtemp(prefix="vit_t5_dsi_hf_home_")
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_DATASETS_CACHE"] = os.path.join(_HF_HOME, "datasets")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402  (after the environment above)


@pytest.fixture(autouse=True, scope="session")
def _isolated_hf_home():
    yield
    shutil.rmtree(_HF_HOME, ignore_errors=True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


CAPTIONS = [
    "a large red circle in the top left",
    "a small blue square at the bottom right",
    "two green triangles and a yellow star",
    "there is a purple cross in the center of the picture",
    "an orange circle next to a white square",
]


@pytest.fixture(scope="session")
def tokenizer():
    from vit_t5_dsi.data.caption_tokenizer import train_caption_tokenizer

    return train_caption_tokenizer(CAPTIONS * 4, vocab_size=160)


def tiny_config(variant="cross_attention", vocab_size=160, **kwargs):
    from vit_t5_dsi.checkpoint.configuration_vit_t5_dsi import ViTT5DSIConfig

    return ViTT5DSIConfig.from_preset("tiny", variant=variant, vocab_size=vocab_size, **kwargs)
