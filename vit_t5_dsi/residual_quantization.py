"""Residual-quantized identifiers (GENIUS, TIGER): every token of an id is a code that carries meaning.

Level 0 k-means-clusters the image embeddings; each later level clusters what the earlier levels left unexplained
(the residuals). An image's id is its code at every level, written with one vocabulary token per (level, code),
e.g. `<l0_c4><l1_c17><l2_c3>`, so a caption that predicts "a red shape" can predict the first token and each
further token refines it. Unlike hierarchical k-means ids, no token is an arbitrary position, except where
images share every code: only those cells get one more level, the image's position in its cell.

Scikit-learn's k-means is used (not a hand-written one): it is deterministic under `random_state` and well kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .optional_imports import optional_import

CODE_TOKEN = "<l{level}_c{code}>"


@dataclass
class ResidualCodes:
    """Codes (num_images, num_levels); `position` is each image's place in its cell (-1 where the cell holds one
    image, so the id needs no collision level)."""

    codes: np.ndarray
    position: np.ndarray
    codes_per_level: list[int]
    usage: list[int] = field(default_factory=list)  # distinct codes used per level

    @property
    def num_levels(self) -> int:
        return self.codes.shape[1]

    @property
    def num_colliding_images(self) -> int:
        return int((self.position >= 0).sum())

    def id_tokens(self, row: int) -> list[str]:
        tokens = [CODE_TOKEN.format(level=level, code=int(code)) for level, code in enumerate(self.codes[row])]
        if self.position[row] >= 0:
            tokens.append(CODE_TOKEN.format(level=self.num_levels, code=int(self.position[row])))
        return tokens

    def summary(self) -> dict:
        """What the log and protocol.json report: levels, codes and their usage, and the collisions."""
        cells = {tuple(row) for row in self.codes.tolist()}
        return {"num_levels": self.num_levels, "codes_per_level": self.codes_per_level,
                "codes_used_per_level": self.usage, "num_cells": len(cells),
                "colliding_images": self.num_colliding_images,
                "largest_cell": int(self.position.max()) + 1 if self.num_colliding_images else 1}


def residual_quantize(embeddings: np.ndarray, num_levels: int = 3, codes_per_level: int = 16,
                      seed: int = 0) -> ResidualCodes:
    """Quantize (num_images, dim) embeddings into `num_levels` codes each; deterministic for a given `seed`.

    Rows are L2-normalised first (contrastive embeddings are compared by cosine). A level never asks k-means for
    more clusters than there are distinct residuals.
    """
    KMeans = optional_import("sklearn.cluster", "rq ids (k-means)").KMeans

    embeddings = np.asarray(embeddings, dtype=np.float64)
    if embeddings.ndim != 2 or len(embeddings) == 0:
        raise ValueError(f"rq ids need a (num_images, dim) embedding matrix, got shape {embeddings.shape}.")
    if not np.isfinite(embeddings).all():
        raise ValueError("rq ids: the embeddings contain NaN or infinite values.")
    if num_levels < 1:
        raise ValueError(f"num_levels must be >= 1, got {num_levels}.")
    if codes_per_level < 2:
        raise ValueError(f"codes_per_level must be >= 2, got {codes_per_level}.")
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    residual = embeddings / np.where(norms > 0, norms, 1.0)
    codes = np.zeros((len(embeddings), num_levels), dtype=np.int64)
    usage = []
    for level in range(num_levels):
        distinct = len(np.unique(residual.round(decimals=9), axis=0))
        clusters = min(codes_per_level, distinct)
        if clusters < 2:  # nothing left to tell apart: one code for all
            labels, centers = np.zeros(len(residual), dtype=np.int64), residual.mean(0, keepdims=True)
        else:
            kmeans = KMeans(n_clusters=clusters, n_init=1, random_state=seed + level).fit(residual)
            labels, centers = kmeans.labels_.astype(np.int64), kmeans.cluster_centers_
        codes[:, level] = labels
        usage.append(int(len(np.unique(labels))))
        residual = residual - centers[labels]
    position = np.full(len(embeddings), -1, dtype=np.int64)
    cells: dict[tuple, list[int]] = {}
    for row, cell in enumerate(map(tuple, codes.tolist())):
        cells.setdefault(cell, []).append(row)
    for members in cells.values():
        if len(members) > 1:
            position[members] = np.arange(len(members))
    return ResidualCodes(codes, position, [codes_per_level] * num_levels, usage)


__all__ = ["ResidualCodes", "residual_quantize", "CODE_TOKEN"]
