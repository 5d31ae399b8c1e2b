"""Building a collection's identifiers: the training-time half of the image index (checkpoints only load them).

Kept out of `checkpoint/` so that the code a checkpoint carries never includes the clustering and quantization
that made its identifiers."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..checkpoint.image_index import ATOMIC_TOKEN, EMBEDDING_SCHEMES, SCHEMES, ImageIndex
from .residual_quantization import residual_quantize
from .semantic_ids import hierarchical_kmeans_ids


def build_image_index(keys: Sequence[str], tokenizer, scheme: str = "naive", *, embeddings: np.ndarray | None = None,
                      num_clusters: int = 10, max_leaf_size: int = 100, seed: int = 0, rq_num_levels: int = 3,
                      rq_codes_per_level: int = 16) -> ImageIndex:
    """Assign identifiers. `atomic` and `rq` add tokens to `tokenizer` (resize the model after:
    `index.resize_model_embeddings(model)`); `semantic` and `rq` need one embedding row per key."""
    keys = [str(k) for k in keys]
    info: dict = {}
    added: list[str] = []
    if scheme in EMBEDDING_SCHEMES:
        if embeddings is None:
            raise ValueError(f"scheme={scheme!r} needs `embeddings` (one row per image).")
        if len(embeddings) != len(keys):
            raise ValueError(f"scheme={scheme!r}: {len(embeddings)} embedding rows for {len(keys)} images.")
    if scheme == "naive":
        id_strings = [str(i) for i in range(len(keys))]
    elif scheme == "atomic":
        id_strings = added = [ATOMIC_TOKEN.format(i) for i in range(len(keys))]
    elif scheme == "semantic":
        id_strings = hierarchical_kmeans_ids(embeddings, num_clusters, max_leaf_size, seed)
    elif scheme == "rq":
        codes = residual_quantize(embeddings, rq_num_levels, rq_codes_per_level, seed)
        rows = [codes.id_tokens(row) for row in range(len(keys))]
        # written without spaces: a tokenizer splits added tokens out exactly, with nothing between them
        id_strings = ["".join(tokens) for tokens in rows]
        added = sorted({t for tokens in rows for t in tokens},
                       key=lambda t: tuple(int(x) for x in t[2:-1].split("_c")))
        info = codes.summary()
    else:
        raise ValueError(f"scheme={scheme!r} is not one of {', '.join(SCHEMES)}.")
    if added:
        tokenizer.add_tokens(added)
    token_ids = tokenizer(list(id_strings), add_special_tokens=False)["input_ids"]
    if scheme == "rq":
        expected = [tokenizer.convert_tokens_to_ids(tokens) for tokens in rows]
        wrong = next((i for i, (got, want) in enumerate(zip(token_ids, expected)) if list(got) != want), None)
        if wrong is not None:
            raise ValueError(f"The tokenizer splits rq id {id_strings[wrong]!r} into {token_ids[wrong]}, not one "
                             f"token per code {expected[wrong]}.")
    index = ImageIndex(keys, id_strings, token_ids, scheme, tokenizer.eos_token_id, tokenizer.pad_token_id, added,
                       scheme_info=info)
    if scheme == "rq":
        index.code_vectors = {tokenizer.convert_tokens_to_ids(name): vector
                              for name, vector in codes.code_vectors().items() if name in added}
        index.codebooks = [np.asarray(c, dtype=np.float32) for c in codes.centers]  # saved: new images use them
    return index


@torch.no_grad()
def initialise_code_embeddings(index: ImageIndex, model, seed: int = 0) -> int:
    """Start each rq code token's embedding (tied input/output rows) at its code's vector (GENIUS), so the
    decoder begins with tokens whose similarities are those of the image embeddings. Vectors are mapped to
    the model's width by a fixed random orthogonal map when the widths differ, and scaled to the embeddings'
    mean norm. Returns the number of rows set (0 when the index was not just built with rq ids)."""
    if not index.code_vectors:
        return 0
    weight = model.get_input_embeddings().weight
    rows = torch.as_tensor(list(index.code_vectors))
    vectors = torch.as_tensor(np.stack(list(index.code_vectors.values())), dtype=torch.float32)
    if vectors.shape[1] != weight.shape[1]:
        generator = torch.Generator().manual_seed(seed)
        mixing = torch.linalg.qr(torch.randn(max(vectors.shape[1], weight.shape[1]),
                                             min(vectors.shape[1], weight.shape[1]), generator=generator))[0]
        vectors = vectors @ (mixing if vectors.shape[1] > weight.shape[1] else mixing.T)
    norm = weight.norm(dim=1).mean()
    vectors = torch.nn.functional.normalize(vectors, dim=1) * norm
    weight[rows] = vectors.to(weight.dtype).to(weight.device)
    output = model.get_output_embeddings()
    if output is not None and output.weight.data_ptr() != weight.data_ptr():
        output.weight[rows] = vectors.to(output.weight.dtype).to(output.weight.device)
    return len(rows)
