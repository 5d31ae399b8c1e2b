"""What the two model families return from `forward` (transformers `ModelOutput`s: attributes, keys or a tuple)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.modeling_outputs import Seq2SeqLMOutput
from transformers.utils import ModelOutput


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


__all__ = ["GenerativeOutput", "DualEncoderOutput"]
