"""Loading a checkpoint of any variant, and the dense re-ranker a generative checkpoint is paired with: the one
place where checkpoints become models (the pipeline, the retriever, the app and the trainer all come here)."""

from __future__ import annotations

import logging
import os

import torch

from .checkpoint_io import DUAL_ENCODER_SUBFOLDER, cannot_rerank_a_dual_encoder
from .configuration_vit_t5_dsi import DUAL_ENCODER, ViTT5DSIConfig
from .image_index_files import HUB_KWARGS, checkpoint_file
from .modeling_vit_t5_dsi import ViTT5DSIDualEncoderModel, ViTT5DSIForConditionalGeneration, ViTT5DSIPreTrainedModel
from .processing_vit_t5_dsi import ViTT5DSIProcessor
from .ranking import DenseReranker

logger = logging.getLogger(__name__)

# the folder of a generative checkpoint that holds its own dual encoder (a default run trains it first): every
# search surface re-ranks with it by default
RERANKER_SUBFOLDER = DUAL_ENCODER_SUBFOLDER  # the dense stage's dual encoder, inside a generative checkpoint


def model_class_for_variant(variant: str) -> type[ViTT5DSIPreTrainedModel]:
    return ViTT5DSIDualEncoderModel if variant == DUAL_ENCODER else ViTT5DSIForConditionalGeneration


def load_dsi_model(name_or_path: str, strict: bool = False, **kwargs) -> ViTT5DSIPreTrainedModel:
    """Load a checkpoint of any variant with the class its config names (`kwargs` reach every download).
    `strict`: a missing, unexpected or mis-shaped weight is an error (transformers only warns), as when resuming."""
    config = ViTT5DSIConfig.from_pretrained(name_or_path, **{k: v for k, v in kwargs.items() if k in HUB_KWARGS})
    cls = model_class_for_variant(config.variant)
    if not strict:
        return cls.from_pretrained(name_or_path, **kwargs)
    model, info = cls.from_pretrained(name_or_path, output_loading_info=True, **kwargs)
    problems = {kind: sorted(info.get(kind) or []) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(problems.values()):
        raise ValueError(f"{name_or_path}: weights do not match the model: " + "; ".join(
            f"{len(keys)} {kind.replace('_', ' ')} (e.g. {keys[:3]})" for kind, keys in problems.items() if keys))
    return model


def load_dense_reranker(name_or_path: str, weight: float = 0.5, device: str | torch.device | None = None,
                        **hub_kwargs) -> DenseReranker:
    """A dual-encoder checkpoint ready to re-rank with `weight`: a directory (e.g. a generative checkpoint's
    `dual_encoder` folder), a Hub repo with `subfolder="dual_encoder"`, or `"user/repo/dual_encoder"` (the part after
    the repo id is the subfolder)."""
    name_or_path, hub_kwargs = _split_hub_subfolder(str(name_or_path), hub_kwargs)
    model = load_dsi_model(name_or_path, **hub_kwargs)
    processor = ViTT5DSIProcessor.from_pretrained(name_or_path, **hub_kwargs)
    return DenseReranker(model.to(device) if device is not None else model, processor, weight)


def _split_hub_subfolder(name_or_path: str, hub_kwargs: dict) -> tuple[str, dict]:
    """`user/repo/sub/folder` (not a local path) -> (`user/repo`, subfolder `sub/folder`): a Hub id has one slash."""
    parts = name_or_path.split("/")
    if os.path.exists(name_or_path) or len(parts) <= 2 or name_or_path.startswith((".", "/", "~")):
        return name_or_path, hub_kwargs
    subfolder = "/".join(filter(None, [hub_kwargs.get("subfolder"), *parts[2:]]))
    return "/".join(parts[:2]), {**hub_kwargs, "subfolder": subfolder}


def own_reranker_location(name_or_path: str, **hub_kwargs) -> tuple[str, dict] | None:
    """(path or repo, hub kwargs) of the dual encoder a checkpoint carries in `dual_encoder/`, locally or on the Hub
    (the same `revision`, `token`, ...), or None when it carries none."""
    hub_kwargs = {k: v for k, v in hub_kwargs.items() if k in HUB_KWARGS and v is not None}
    subfolder = "/".join(filter(None, [hub_kwargs.pop("subfolder", None), RERANKER_SUBFOLDER]))
    if os.path.isdir(name_or_path):
        folder = os.path.join(name_or_path, subfolder)
        return (folder, hub_kwargs) if os.path.isfile(os.path.join(folder, "config.json")) else None
    if checkpoint_file(name_or_path, "config.json", subfolder=subfolder, **hub_kwargs) is None:
        return None
    return name_or_path, {**hub_kwargs, "subfolder": subfolder}


def resolve_reranker(name_or_path: str | None, config, rerank: bool | None = None, rerank_with: str | None = None,
                     rerank_weight: float = 0.5, device: str | torch.device | None = None,
                     **hub_kwargs) -> DenseReranker | None:
    """The re-ranker every search surface uses for the checkpoint `name_or_path` (of `config`).

    `rerank_with` (a dual-encoder checkpoint) when given; else the checkpoint's own `dual_encoder/` (locally or on
    the Hub) when it has one, unless `rerank=False`. `rerank=True` demands one. A dual encoder ranks by itself."""
    if rerank not in (None, True, False):
        raise ValueError(f"rerank must be True, False or None (re-rank when the checkpoint can), got {rerank!r}.")
    if not 0.0 <= float(rerank_weight) <= 1.0:
        raise ValueError(f"rerank_weight must be in [0, 1], got {rerank_weight}.")
    if rerank_with is not None and rerank is False:
        raise ValueError(f"rerank=False turns re-ranking off, but rerank_with={rerank_with!r} asks for it.")
    if config.is_dual_encoder:
        if rerank_with is not None or rerank:
            raise ValueError(cannot_rerank_a_dual_encoder())
        return None
    if rerank_with is not None:
        return load_dense_reranker(rerank_with, rerank_weight, device)
    if rerank is False:
        return None
    location = None
    if name_or_path:
        try:
            location = own_reranker_location(name_or_path, **hub_kwargs)
        except OSError as err:  # offline, or the Hub unreachable: the search works without its optional re-ranker
            if rerank:
                raise
            logger.warning("Not re-ranking: could not look for %s/%s (%s).", name_or_path, RERANKER_SUBFOLDER, err)
    if location is None:
        if rerank:
            raise ValueError(f"rerank=True: {name_or_path or 'this model'} has no {RERANKER_SUBFOLDER}/ folder to "
                             "re-rank with; pass rerank_with=A_DUAL_ENCODER_CHECKPOINT.")
        return None
    return load_dense_reranker(location[0], rerank_weight, device, **location[1])


__all__ = ["model_class_for_variant", "load_dsi_model", "load_dense_reranker", "own_reranker_location",
           "resolve_reranker", "RERANKER_SUBFOLDER"]
