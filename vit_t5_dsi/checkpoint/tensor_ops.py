"""Tensor helpers the models share: mixed batches of two lengths, masked means, a multi-positive InfoNCE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutputWithPooling


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


__all__ = ["pad_and_stack", "masked_mean", "normalised_mean_output", "multi_positive_nce"]
