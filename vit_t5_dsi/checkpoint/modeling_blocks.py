"""The pieces the models are built from: the image tower (a ViT by default, or any timm / AutoModel vision
backbone), what the two model families return from `forward` (transformers `ModelOutput`s: attributes, keys or a
tuple), and the tensor helpers they share (mixed batches of two lengths, masked means, a multi-positive InfoNCE).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, PreTrainedModel, TimmWrapperConfig, TimmWrapperModel, ViTModel
from transformers.modeling_outputs import BaseModelOutputWithPooling, Seq2SeqLMOutput
from transformers.utils import ModelOutput

from .checkpoint_io import optional_import


@dataclass
class GenerativeOutput(Seq2SeqLMOutput):
    """Output of `ViTT5DSIForConditionalGeneration.forward`: T5's `Seq2SeqLMOutput`, with the loss of the whole
    training objective.

    loss (`torch.FloatTensor` of shape `()`, *optional*, returned with `labels`):
        Token cross-entropy of the labels (identifiers, and caption tokens for captioning rows), plus the codebook
        variant's commitment loss and the optional image-caption alignment loss.
    logits (`torch.FloatTensor` of shape `(batch_size, label_length, vocab_size)`):
        Decoder scores for each label position (before softmax).
    encoder_last_hidden_state (`torch.FloatTensor` of shape `(batch_size, source_length, d_model)`):
        What the decoder reads: projected image states, T5-encoded captions, or both for a mixed batch.
    The other fields (caches, per-layer states and attentions) are T5's, filled when asked for.
    """


@dataclass
class DualEncoderOutput(ModelOutput):
    """Output of `ViTT5DSIDualEncoderModel.forward`.

    loss (`torch.FloatTensor` of shape `()`, *optional*, with both images and captions):
        Symmetric multi-positive InfoNCE over the batch (captions sharing a label are all positives of its image).
    logits_per_text (`torch.FloatTensor` of shape `(text_batch_size, image_batch_size)`, *optional*):
        Temperature-scaled cosine similarities, caption rows against image columns.
    text_embeds (`torch.FloatTensor` of shape `(text_batch_size, projection_dim)`, *optional*):
        L2-normalised caption embeddings (given `input_ids`).
    image_embeds (`torch.FloatTensor` of shape `(image_batch_size, projection_dim)`, *optional*):
        L2-normalised image embeddings (given `pixel_values`).
    """

    loss: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None


def pad_and_stack(first: torch.Tensor, first_mask: torch.Tensor, second: torch.Tensor, second_mask: torch.Tensor):
    """Concatenate two (B, S, D) batches of different lengths along the batch, right-padding the shorter."""
    length = max(first.shape[1], second.shape[1])

    def pad(states, mask):
        extra = length - states.shape[1]
        return F.pad(states, (0, 0, 0, extra)), F.pad(mask, (0, extra))

    first, first_mask = pad(first, first_mask)
    second, second_mask = pad(second, second_mask)
    return torch.cat([first, second]), torch.cat([first_mask, second_mask])


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(states.dtype).unsqueeze(-1)
    return (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def normalised_mean_output(states: torch.Tensor, mask: torch.Tensor) -> BaseModelOutputWithPooling:
    """`states` with their L2-normalised masked mean as `pooler_output` (what `get_*_features` return)."""
    return BaseModelOutputWithPooling(last_hidden_state=states, pooler_output=F.normalize(masked_mean(states, mask),
                                                                                          dim=-1))


def multi_positive_nce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """InfoNCE where a row may have several positive columns: -log of the probability mass on them."""
    positive_logits = logits.masked_fill(~positives, float("-inf"))
    return (torch.logsumexp(logits, dim=1) - torch.logsumexp(positive_logits, dim=1)).mean()


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


__all__ = ["GenerativeOutput", "DualEncoderOutput", "pad_and_stack", "masked_mean", "normalised_mean_output",
           "multi_positive_nce", "build_vision_tower", "vision_tower_width", "load_pretrained_vision_tower"]
