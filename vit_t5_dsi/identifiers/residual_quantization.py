"""Residual-quantized identifiers (GENIUS, TIGER): every token of an id is a code that carries meaning.

Level 0 k-means-clusters the image embeddings; each later level clusters what the earlier levels left unexplained
(the residuals). An image's id is its code at every level, written with one vocabulary token per (level, code),
e.g. `<l0_c4><l1_c17><l2_c3>`, so a caption that predicts "a red shape" can predict the first token and each
further token refines it. Images that share every code (a cell) get one more quantization level, computed on
their residuals only, so even that token means something ("residual direction 5"); an image that still shares
its codes with another gets a last token, its position among them. Most ids never need either.

Scikit-learn's k-means is used (not a hand-written one): it is deterministic under `random_state` and well kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..checkpoint.checkpoint_io import optional_import

CODE_TOKEN = "<l{level}_c{code}>"


@dataclass
class ResidualCodes:
    """Codes (num_images, num_levels); `extra` is the extra level's code of images that share all their codes
    (-1 for the others), `position` an image's place among those that still share everything (-1 otherwise)."""

    codes: np.ndarray
    extra: np.ndarray
    position: np.ndarray
    codes_per_level: list[int]
    usage: list[int] = field(default_factory=list)  # distinct codes used per level
    centers: list[np.ndarray] = field(default_factory=list)  # per level (the extra level last): code vectors

    @property
    def num_levels(self) -> int:
        return self.codes.shape[1]

    def id_tokens(self, row: int) -> list[str]:
        tokens = [CODE_TOKEN.format(level=level, code=int(code)) for level, code in enumerate(self.codes[row])]
        if self.extra[row] >= 0:
            tokens.append(CODE_TOKEN.format(level=self.num_levels, code=int(self.extra[row])))
        if self.position[row] >= 0:
            tokens.append(CODE_TOKEN.format(level=self.num_levels + 1, code=int(self.position[row])))
        return tokens

    def code_vectors(self) -> dict[str, np.ndarray]:
        """Token -> the vector its code stands for (a k-means centre; residual levels hold residual directions).
        Position tokens have none."""
        return {CODE_TOKEN.format(level=level, code=code): vector
                for level, centers in enumerate(self.centers) for code, vector in enumerate(centers)}

    def summary(self) -> dict:
        """What the log and protocol.json report: levels, codes and their usage, and the collisions."""
        cells = {tuple(row) for row in self.codes.tolist()}
        return {"num_levels": self.num_levels, "codes_per_level": self.codes_per_level,
                "codes_used_per_level": self.usage, "num_cells": len(cells),
                "colliding_images": int((self.extra >= 0).sum()),
                "extra_level_codes_used": int(len(np.unique(self.extra[self.extra >= 0]))),
                "images_with_position_token": int((self.position >= 0).sum()),
                "largest_shared_id": int(self.position.max()) + 1 if (self.position >= 0).any() else 1}


def _kmeans(points: np.ndarray, clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and centres; at most as many clusters as distinct points (one cluster when all are equal)."""
    KMeans = optional_import("sklearn.cluster", "rq ids (k-means)").KMeans

    clusters = min(clusters, len(np.unique(points.round(decimals=9), axis=0)))
    if clusters < 2:
        return np.zeros(len(points), dtype=np.int64), points.mean(0, keepdims=True)
    kmeans = KMeans(n_clusters=clusters, n_init=1, random_state=seed).fit(points)
    return kmeans.labels_.astype(np.int64), kmeans.cluster_centers_


def _distinct_nearest(points: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Each point's code among `centers`, nearest first but distinct within the group (greedy on distance), so
    the extra level separates a cell whenever it has enough codes; the rest share the last code."""
    distances = ((points[:, None, :] - centers[None, :, :]) ** 2).sum(-1)
    assigned = np.full(len(points), -1, dtype=np.int64)
    for flat in np.argsort(distances, axis=None, kind="stable"):
        point, code = divmod(int(flat), len(centers))
        if assigned[point] < 0 and code not in assigned:
            assigned[point] = code
    left = assigned < 0  # more points than codes: these share a code (and get a position token)
    assigned[left] = distances[left].argmin(1)
    return assigned


def _groups(rows: np.ndarray) -> list[np.ndarray]:
    """Indices of identical rows, for every group of two or more."""
    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(map(tuple, rows.tolist())):
        groups.setdefault(row, []).append(i)
    return [np.asarray(members) for members in groups.values() if len(members) > 1]


def residual_quantize(embeddings: np.ndarray, num_levels: int = 3, codes_per_level: int = 16,
                      seed: int = 0) -> ResidualCodes:
    """Quantize (num_images, dim) embeddings into `num_levels` codes each; deterministic for a given `seed`.

    Rows are L2-normalised first (contrastive embeddings are compared by cosine). A level never asks k-means for
    more clusters than there are distinct residuals.
    """
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
    usage, level_centers = [], []
    for level in range(num_levels):
        labels, centers = _kmeans(residual, codes_per_level, seed + level)
        codes[:, level] = labels
        usage.append(int(len(np.unique(labels))))
        level_centers.append(centers)
        residual = residual - centers[labels]
    extra = np.full(len(embeddings), -1, dtype=np.int64)
    cells = _groups(codes)
    if cells:  # one more level, fitted on the residuals of the images that need it
        colliding = np.concatenate(cells)
        _, centers = _kmeans(residual[colliding], codes_per_level, seed + num_levels)
        level_centers.append(centers)
        for members in cells:
            extra[members] = _distinct_nearest(residual[members], centers)
    position = np.full(len(embeddings), -1, dtype=np.int64)
    for members in _groups(np.concatenate([codes, extra[:, None]], axis=1)):
        position[members] = np.arange(len(members))
    return ResidualCodes(codes, extra, position, [codes_per_level] * num_levels, usage, level_centers)


def quantize_with_codebooks(embeddings: np.ndarray, codebooks: list[np.ndarray], num_levels: int,
                            allowed: list[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Codes (n, num_levels) of new embeddings under frozen codebooks (each level's nearest code to the residual,
    as `residual_quantize` assigned them), and the residuals left after the last level. `allowed[level]`: the
    codes that may be chosen there (those the tokenizer has a token for); the others are skipped."""
    embeddings = np.asarray(embeddings, dtype=np.float64)
    if embeddings.ndim != 2 or not np.isfinite(embeddings).all():
        raise ValueError(f"rq ids need finite (num_images, dim) embeddings, got shape {embeddings.shape}.")
    if len(codebooks) < num_levels:
        raise ValueError(f"{len(codebooks)} codebooks for {num_levels} rq levels.")
    if codebooks[0].shape[1] != embeddings.shape[1]:
        raise ValueError(f"The embeddings have {embeddings.shape[1]} dimensions and the rq codebooks "
                         f"{codebooks[0].shape[1]}: they come from another encoder.")
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    residual = embeddings / np.where(norms > 0, norms, 1.0)
    codes = np.zeros((len(embeddings), num_levels), dtype=np.int64)
    for level in range(num_levels):
        centers = np.asarray(codebooks[level], dtype=np.float64)
        distances = ((residual[:, None, :] - centers[None, :, :]) ** 2).sum(-1)
        if allowed is not None:
            mask = np.full(len(centers), np.inf)
            mask[allowed[level]] = 0.0
            distances = distances + mask[None, :]
        codes[:, level] = distances.argmin(1)
        residual = residual - centers[codes[:, level]]
    return codes, residual


__all__ = ["ResidualCodes", "residual_quantize", "quantize_with_codebooks", "CODE_TOKEN"]
