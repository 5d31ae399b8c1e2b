"""Loading a checkpoint of any variant, and the dense re-ranker a generative checkpoint is paired with: the one
place where checkpoints become models (the pipeline, the retriever, the app and the trainer all come here)."""

from __future__ import annotations

import torch

from .configuration_vit_t5_dsi import DUAL_ENCODER, ViTT5DSIConfig
from .dense_reranking import DenseReranker
from .image_index_files import HUB_KWARGS
from .modeling_vit_t5_dsi import ViTT5DSIDualEncoderModel, ViTT5DSIForConditionalGeneration, ViTT5DSIPreTrainedModel
from .processing_vit_t5_dsi import ViTT5DSIProcessor


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
    """A dual-encoder checkpoint (e.g. a generative checkpoint's `dual_encoder` folder, or the Hub repo with
    `subfolder="dual_encoder"`) ready to re-rank with `weight`."""
    model = load_dsi_model(name_or_path, **hub_kwargs)
    processor = ViTT5DSIProcessor.from_pretrained(name_or_path, **hub_kwargs)
    return DenseReranker(model.to(device) if device is not None else model, processor, weight)


__all__ = ["model_class_for_variant", "load_dsi_model", "load_dense_reranker"]
