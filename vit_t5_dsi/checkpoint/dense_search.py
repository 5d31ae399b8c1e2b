"""The dual encoder's own search over the indexed images' embeddings, as a user would deploy it: faiss when it is
installed (a flat inner-product index: exact, what evaluation uses; past `APPROXIMATE_ABOVE` images the search
surfaces switch to an IVF index), else one matrix product in torch (exact). Embeddings are L2-normalised, so inner
product is cosine.

faiss is imported inside `try`: transformers' remote-code loader refuses a checkpoint whose code imports a missing
module outside one, and a checkpoint must load where faiss is not installed."""

from __future__ import annotations

import math
import weakref

import numpy as np
import torch

# Up to this many images every search is exact (a flat index: at 1M x 256 floats one query batch is ~1 GFLOP, a few
# ms); above it the pipeline, the retriever and the app search an IVF index (evaluation always stays exact).
APPROXIMATE_ABOVE = 1_000_000
# IVF: ~4 sqrt(N) lists, trained on at most 64 points per list (faiss' own guidance is 30-256), 32 lists probed
IVF_LISTS_PER_SQRT_N, IVF_TRAINING_POINTS_PER_LIST, IVF_NPROBE = 4, 64, 32

# built indexes by id of their embeddings tensor, dropped with the tensor (a tensor compares element-wise, so it
# cannot key a WeakKeyDictionary)
_built: dict[int, tuple] = {}


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def faiss_index_for(image_embeds: torch.Tensor, approximate: bool):
    """The faiss index over `image_embeds` (built once per tensor and kind), or None without faiss or off the
    CPU (a GPU matrix product is already what a flat GPU index does)."""
    faiss = _faiss()
    if faiss is None or image_embeds.device.type != "cpu":
        return None
    kind = "ivf" if approximate and len(image_embeds) > APPROXIMATE_ABOVE else "flat"
    cached = _built.get(id(image_embeds))
    if cached is not None and cached[:2] == (kind, image_embeds.data_ptr()):
        return cached[2]
    vectors = np.ascontiguousarray(image_embeds.detach().float().numpy())
    dim = vectors.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    else:
        lists = int(IVF_LISTS_PER_SQRT_N * math.sqrt(len(vectors)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(0).choice(len(vectors), min(len(vectors), lists * IVF_TRAINING_POINTS_PER_LIST),
                                                 replace=False)
        index.train(vectors[np.sort(sample)])
        index.nprobe = IVF_NPROBE
    index.add(vectors)
    if id(image_embeds) not in _built:
        weakref.finalize(image_embeds, _built.pop, id(image_embeds), None)
    _built[id(image_embeds)] = (kind, image_embeds.data_ptr(), index)
    return index


@torch.no_grad()
def search_embeddings(queries: torch.Tensor, image_embeds: torch.Tensor, k: int, approximate: bool = False
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, positions) per query by inner product; positions -1 where fewer than k images exist."""
    k = min(k, len(image_embeds))
    index = faiss_index_for(image_embeds, approximate)
    if index is not None:
        scores, positions = index.search(np.ascontiguousarray(queries.detach().float().cpu().numpy()), k)
        return scores.astype(np.float32), positions.astype(np.int64)
    similarity = queries.float() @ image_embeds.float().T
    scores, positions = similarity.topk(k, dim=1)
    return scores.cpu().numpy(), positions.cpu().numpy()


__all__ = ["search_embeddings", "faiss_index_for", "APPROXIMATE_ABOVE"]
