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


def _softmax_first(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over dim 0. The decoder step's attention rows are a handful of keys long, and PyTorch's CPU softmax
    over such a short last dimension pays per row (160-280 us for a batch of 32 queries' beams, measured); over
    a leading dimension it runs across rows (8-15 us), so the scores are laid out keys-first."""
    return torch.softmax(scores, 0)


class T5DecoderSteps:
    """T5's decoder run one token at a time against its own weights, for the trie beam search.

    Written by hand because at small widths transformers' T5 stack costs more in dispatch than in arithmetic: every
    call builds causal and cross masks, a relative-position bias, cache bookkeeping and output objects, for a
    handful of tiny matrix products. This class computes the same thing (`T5Stack` + the LM head, eval mode, no
    dropout) in as few tensor operations as it can, since each costs microseconds of dispatch: pre-norm
    self-attention with T5's relative bias (its buckets looked up once) over one preallocated key/value buffer for
    all layers (one copy per layer and step, one gather per step when beams move), cross-attention over keys and
    values projected once per query (beams of a query share them: no copy per beam), the feed-forward block, the
    final norm, the LM head. Norms are `F.rms_norm` (T5's norm is an RMS norm without bias), attention is
    unscaled as in T5 with its softmax taken over keys laid out first (`_softmax_first`), and residual additions
    are fused into the output projections (`addmm`). Rows are queries x beams, query-major.
    """

    def __init__(self, language_model, encoder_states: torch.Tensor, encoder_mask: torch.Tensor | None,
                 max_steps: int = 8):
        config, decoder = language_model.config, language_model.decoder
        self.heads, self.head_dim, self.inner = config.num_heads, config.d_kv, config.num_heads * config.d_kv
        self.embed, self.blocks, self.final_norm = decoder.embed_tokens, list(decoder.block), decoder.final_layer_norm
        self.lm_head = language_model.lm_head
        self.output_scale = config.d_model ** -0.5 if getattr(config, "scale_decoder_outputs", False) else None
        batch, length = encoder_states.shape[:2]
        split = (batch, length, self.heads, self.head_dim)
        self.cross = [(block.layer[1].EncDecAttention.k(encoder_states).view(split).transpose(1, 2),
                       block.layer[1].EncDecAttention.v(encoder_states).view(split).transpose(1, 2))
                      for block in self.blocks]  # (B, H, S, dk) per layer
        self.cross_bias = torch.zeros(batch, 1, 1, length, dtype=encoder_states.dtype, device=encoder_states.device)
        if encoder_mask is not None:  # padded positions of a query are never attended to
            self.cross_bias.masked_fill_(~encoder_mask.bool()[:, None, None, :], torch.finfo(encoder_states.dtype).min)
        self.dtype, self.device = encoder_states.dtype, encoder_states.device
        self.cache: torch.Tensor | None = None  # (layers, 2, capacity, rows, H, dk): keys and values
        self.capacity = max(1, max_steps)
        self.batch, self.length = batch, 0
        self._position_bias(self.capacity)

    def _position_bias(self, capacity: int) -> None:
        """T5's causal relative-position bias of position t to positions 0..t, for every t < capacity, looked up
        once (T5: the first layer holds the bias table)."""
        owner = self.blocks[0].layer[0].SelfAttention
        positions = torch.arange(capacity, device=self.device)
        buckets = owner._relative_position_bucket(
            positions[None, :] - positions[:, None], bidirectional=False,
            num_buckets=owner.relative_attention_num_buckets, max_distance=owner.relative_attention_max_distance)
        table = owner.relative_attention_bias(buckets).to(self.dtype)  # (query position, key position, H)
        self.position_bias = [table[t, :t + 1, None, :] for t in range(capacity)]  # (t + 1, 1, H)

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i of the next step continues row `rows[i]` of this one (beams move within their query)."""
        self.cache = self.cache.index_select(3, rows)

    def _grow(self, rows: int) -> None:
        """Allocate the key/value buffer at the first step, or double it when the ids are longer than planned."""
        if self.cache is None:
            self.cache = torch.zeros(len(self.blocks), 2, self.capacity, rows, self.heads, self.head_dim,
                                     dtype=self.dtype, device=self.device)
        elif self.length == self.capacity:
            self.cache = torch.cat([self.cache, torch.zeros_like(self.cache)], 2)
            self.capacity *= 2
            self._position_bias(self.capacity)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (rows, vocabulary) for the next token after `tokens` (rows,), one per row."""
        rows, heads, head_dim, t = tokens.shape[0], self.heads, self.head_dim, self.length
        self._grow(rows)
        per_query, bias = rows // self.batch, self.position_bias[t]
        states = self.embed(tokens)
        for layer, block in enumerate(self.blocks):
            self_attention, cross_attention, feed_forward = block.layer
            attention = self_attention.SelfAttention
            normed = F.rms_norm(states, states.shape[-1:], self_attention.layer_norm.weight,
                                self_attention.layer_norm.variance_epsilon)
            query = F.linear(normed, attention.q.weight).view(rows, heads, head_dim)
            keys_values = self.cache[layer]  # (2, capacity, rows, H, dk)
            keys_values[:, t] = torch.stack([F.linear(normed, attention.k.weight),
                                             F.linear(normed, attention.v.weight)]).view(2, rows, heads, head_dim)
            # one query per row against its own t + 1 keys: elementwise products, no batch of tiny matmuls
            weights = _softmax_first((keys_values[0, :t + 1] * query).sum(-1) + bias)  # (t + 1, rows, H)
            attended = (weights[..., None] * keys_values[1, :t + 1]).sum(0)
            states = torch.addmm(states, attended.view(rows, -1), attention.o.weight.t())
            cross = cross_attention.EncDecAttention
            normed = F.rms_norm(states, states.shape[-1:], cross_attention.layer_norm.weight,
                                cross_attention.layer_norm.variance_epsilon)
            query = F.linear(normed, cross.q.weight).view(self.batch, per_query, heads, head_dim).transpose(1, 2)
            key, value = self.cross[layer]
            scores = (torch.matmul(query, key.transpose(-1, -2)) + self.cross_bias).permute(3, 0, 1, 2)
            weights = _softmax_first(scores.contiguous()).permute(1, 2, 3, 0)  # (B, H, W, S)
            attended = torch.matmul(weights, value)
            states = torch.addmm(states, attended.transpose(1, 2).reshape(rows, -1), cross.o.weight.t())
            normed = F.rms_norm(states, states.shape[-1:], feed_forward.layer_norm.weight,
                                feed_forward.layer_norm.variance_epsilon)
            dense = feed_forward.DenseReluDense
            if hasattr(dense, "wi_0"):  # gated: act(wi_0 x) * wi_1 x
                hidden = dense.act(F.linear(normed, dense.wi_0.weight)) * F.linear(normed, dense.wi_1.weight)
            else:
                hidden = dense.act(F.linear(normed, dense.wi.weight))
            states = torch.addmm(states, hidden, dense.wo.weight.t())
        self.length += 1
        states = F.rms_norm(states, states.shape[-1:], self.final_norm.weight, self.final_norm.variance_epsilon)
        if self.output_scale is not None:
            states = states * self.output_scale
        return self.lm_head(states)


__all__ = ["GenerativeOutput", "DualEncoderOutput", "T5DecoderSteps", "pad_and_stack", "masked_mean",
           "normalised_mean_output", "multi_positive_nce", "build_vision_tower", "vision_tower_width",
           "load_pretrained_vision_tower"]
