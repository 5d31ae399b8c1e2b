"""One pass of a model over the indexed images: embeddings, captions, pseudo-queries all go through `map_images`.

Semantic identifiers cluster image embeddings, the dual encoder searches them, and the caption decoder writes
captions from the same pixels. Under DDP each process works on its own share of the images and the shares are
gathered in order, so no process waits while another processes the whole collection (on 10K images that wait
alone could reach the collective timeout) and the work is not repeated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The dual encoder's normalised image embeddings; for a generative model, the mean of its tower's states."""
    if model.config.is_dual_encoder:
        return model.encode_images(pixel_values)
    return model.vision_states(pixel_values).mean(1)


@torch.no_grad()
def map_images(model, keys: Sequence[str], images, processor, compute: Callable[[torch.Tensor], Sequence],
               batch_size: int = 64, device: torch.device | str | None = None, desc: str | None = None,
               distributed: bool = True) -> list:
    """`compute(pixel_values)` -> one result per image, for every key, in `keys` order, with the model in eval
    mode on `device` (default: the model's). Call it on every process when `distributed` (it gathers)."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState() if distributed else None
    sharded = state is not None and state.num_processes > 1
    device = torch.device(device) if device is not None else model.device
    keys = list(keys)
    local_keys = keys
    if sharded:
        with state.split_between_processes(keys) as share:
            local_keys = list(share)
    was_training = model.training
    model.eval()
    results: list = []
    try:
        for pixels in images.batches(local_keys, processor, batch_size,
                                     desc=desc if state is None or state.is_main_process else None):
            results.extend(compute(pixels.to(device)))
    finally:
        model.train(was_training)
    if not sharded:
        return results
    return [item for share in gather_object([results]) for item in share]


def embed_images(model, keys: Sequence[str], images, processor, batch_size: int = 64,
                 device: torch.device | str | None = None, desc: str | None = None,
                 distributed: bool = True) -> torch.Tensor:
    """(len(keys), d) float32 CPU embeddings in `keys` order (`image_features` of each image)."""
    rows = map_images(model, keys, images, processor, lambda pixels: image_features(model, pixels).float().cpu(),
                      batch_size, device, desc, distributed)
    return torch.stack(rows) if rows else torch.zeros((0, 0))


__all__ = ["map_images", "embed_images", "image_features"]
