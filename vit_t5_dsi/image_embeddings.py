"""One embedding per indexed image, from whichever model holds an image tower: the one loop over the collection.

Semantic identifiers cluster these embeddings and the dual encoder searches them. Under DDP each process embeds
its own share of the images and the shares are gathered in order, so no process waits while another embeds the
whole collection (on 10K images that wait alone could reach the collective timeout) and the work is not repeated.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The dual encoder's normalised image embeddings; for a generative model, the mean of its tower's states."""
    if model.config.variant == "dual_encoder":
        return model.encode_images(pixel_values)
    return model.vision_states(pixel_values).mean(1)


@torch.no_grad()
def embed_images(model, keys: Sequence[str], images, processor, batch_size: int = 64,
                 device: torch.device | str | None = None, desc: str | None = None,
                 distributed: bool = True) -> torch.Tensor:
    """(len(keys), d) float32 CPU embeddings in `keys` order, computed on `device` (default: the model's).

    Call it on every process when `distributed` (it gathers); with `distributed=False` one process embeds all.
    """
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState() if distributed else None
    device = torch.device(device) if device is not None else model.device
    was_training = model.training
    model.eval()
    keys = list(keys)
    try:
        if state is None or state.num_processes == 1:
            local_keys = keys
        else:
            with state.split_between_processes(keys) as share:
                local_keys = list(share)
        rows = [image_features(model, pixels.to(device)).float().cpu()
                for pixels in images.batches(local_keys, processor, batch_size,
                                             desc=desc if state is None or state.is_main_process else None)]
    finally:
        model.train(was_training)
    local = torch.cat(rows) if rows else None
    if state is None or state.num_processes == 1:
        return local if local is not None else torch.zeros((0, 0))
    shares = [share for share in gather_object([local]) if share is not None]
    return torch.cat(shares)


__all__ = ["embed_images", "image_features"]
