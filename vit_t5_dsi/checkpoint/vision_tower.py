"""The image tower: a ViT by default, or any timm / AutoModel vision backbone."""

from __future__ import annotations

import logging
import os

from transformers import AutoConfig, AutoModel, PreTrainedModel, TimmWrapperConfig, TimmWrapperModel, ViTModel

from .optional_imports import optional_import

logger = logging.getLogger(__name__)


def build_vision_tower(vision_config) -> PreTrainedModel:
    """The image tower for a vision sub-config; ViT without its pooler (unused parameters break DDP)."""
    if vision_config.model_type == "vit":
        return ViTModel(vision_config, add_pooling_layer=False)
    return AutoModel.from_config(vision_config)


def vision_tower_width(tower: PreTrainedModel) -> int:
    if isinstance(tower, TimmWrapperModel):
        return int(tower.timm_model.num_features)
    return int(tower.config.hidden_size)


def load_pretrained_vision_tower(name_or_path: str) -> PreTrainedModel:
    """A ViT (or any AutoModel vision) checkpoint, a `timm/...` Hub repo, or a bare timm architecture name."""
    timm = optional_import("timm", "a timm image tower")

    if not os.path.isdir(name_or_path) and timm.is_model(name_or_path):
        tower = TimmWrapperModel(TimmWrapperConfig(architecture=name_or_path))
        try:  # timm's own pretrained weights need the network; offline we keep the random init, loudly
            pretrained = timm.create_model(name_or_path, pretrained=True, num_classes=0)
            tower.timm_model.load_state_dict(pretrained.state_dict())
        except Exception as err:  # noqa: BLE001 - any download failure means the same thing here
            logger.warning("timm weights for %r unavailable (%s); the image tower starts from random weights.",
                           name_or_path, err)
        return tower
    config = AutoConfig.from_pretrained(name_or_path)
    if config.model_type == "vit":
        return ViTModel.from_pretrained(name_or_path, add_pooling_layer=False)
    return AutoModel.from_pretrained(name_or_path)
