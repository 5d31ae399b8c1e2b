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


def _attend(scores: torch.Tensor, values: torch.Tensor, equation: str) -> torch.Tensor:
    return torch.einsum(equation, torch.softmax(scores, dim=-1), values)


class T5DecoderSteps:
    """T5's decoder run one token at a time against its own weights, for the trie beam search.

    Written by hand because at small widths transformers' T5 stack costs more in dispatch than in arithmetic: every
    call builds causal and cross masks, a relative-position bias, cache bookkeeping and output objects, for a
    handful of tiny matrix products. This class computes the same thing (`T5Stack` + the LM head, eval mode, no
    dropout): pre-norm self-attention with T5's relative bias over a per-row key/value cache, cross-attention over
    keys and values projected once per query (beams of a query share them: no copy per beam), the feed-forward
    block, the final norm, the LM head. T5 does not scale q.k. Rows are queries x beams, query-major.
    """

    def __init__(self, language_model, encoder_states: torch.Tensor, encoder_mask: torch.Tensor | None):
        config, decoder = language_model.config, language_model.decoder
        self.heads, self.head_dim = config.num_heads, config.d_kv
        self.embed, self.blocks, self.final_norm = decoder.embed_tokens, list(decoder.block), decoder.final_layer_norm
        self.lm_head = language_model.lm_head
        self.output_scale = config.d_model ** -0.5 if getattr(config, "scale_decoder_outputs", False) else None
        self.position_bias_owner = self.blocks[0].layer[0].SelfAttention  # T5: the first layer holds the bias table
        batch, length = encoder_states.shape[:2]
        split = (batch, length, self.heads, self.head_dim)
        self.cross = [(block.layer[1].EncDecAttention.k(encoder_states).view(split).transpose(1, 2),
                       block.layer[1].EncDecAttention.v(encoder_states).view(split).transpose(1, 2))
                      for block in self.blocks]  # (B, H, S, dk) per layer
        self.cross_bias = torch.zeros(batch, 1, 1, length, dtype=encoder_states.dtype, device=encoder_states.device)
        if encoder_mask is not None:  # padded positions of a query are never attended to
            self.cross_bias.masked_fill_(~encoder_mask.bool()[:, None, None, :], torch.finfo(encoder_states.dtype).min)
        self.keys: list[torch.Tensor | None] = [None] * len(self.blocks)
        self.values: list[torch.Tensor | None] = [None] * len(self.blocks)
        self.batch, self.length = batch, 0

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i of the next step continues row `rows[i]` of this one (beams move within their query)."""
        self.keys = [keys[rows] for keys in self.keys]
        self.values = [values[rows] for values in self.values]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (rows, vocabulary) for the next token after `tokens` (rows,), one per row."""
        rows, heads, head_dim = tokens.shape[0], self.heads, self.head_dim
        per_query = rows // self.batch
        owner = self.position_bias_owner  # T5's causal relative-position bias of this position to every earlier one
        buckets = owner._relative_position_bucket(
            torch.arange(self.length + 1, device=tokens.device) - self.length, bidirectional=False,
            num_buckets=owner.relative_attention_num_buckets, max_distance=owner.relative_attention_max_distance)
        bias = owner.relative_attention_bias(buckets).T  # (H, t)
        states = self.embed(tokens)
        for layer, block in enumerate(self.blocks):
            attention = block.layer[0].SelfAttention
            normed = block.layer[0].layer_norm(states)
            query, key, value = (linear(normed).view(rows, heads, 1, head_dim)
                                 for linear in (attention.q, attention.k, attention.v))
            if self.keys[layer] is not None:
                key, value = torch.cat([self.keys[layer], key], 2), torch.cat([self.values[layer], value], 2)
            self.keys[layer], self.values[layer] = key, value
            scores = torch.einsum("rhqd,rhtd->rhqt", query, key) + bias[None, :, None, :]
            states = states + attention.o(_attend(scores, value, "rhqt,rhtd->rhqd").reshape(rows, -1))
            cross = block.layer[1].EncDecAttention
            normed = block.layer[1].layer_norm(states)
            query = cross.q(normed).view(self.batch, per_query, heads, head_dim).transpose(1, 2)  # (B, H, W, dk)
            key, value = self.cross[layer]
            scores = torch.einsum("bhwd,bhsd->bhws", query, key) + self.cross_bias
            attended = _attend(scores, value, "bhws,bhsd->bhwd").transpose(1, 2).reshape(rows, -1)
            states = states + cross.o(attended)
            feed_forward = block.layer[2]
            states = states + feed_forward.DenseReluDense(feed_forward.layer_norm(states))
        self.length += 1
        states = self.final_norm(states)
        if self.output_scale is not None:
            states = states * self.output_scale
        return self.lm_head(states)


__all__ = ["GenerativeOutput", "DualEncoderOutput", "T5DecoderSteps", "pad_and_stack", "masked_mean",
           "normalised_mean_output", "multi_positive_nce", "build_vision_tower", "vision_tower_width",
           "load_pretrained_vision_tower"]
