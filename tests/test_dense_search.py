"""The dual encoder's search: faiss when installed, exact unless a search surface meets a very large collection."""

import numpy as np
import pytest
import torch

import vit_t5_dsi.checkpoint.ranking as dense_search
from vit_t5_dsi.checkpoint.ranking import rank_by_similarity

faiss = pytest.importorskip("faiss", reason="faiss-cpu is part of the test extra")


def unit_rows(n, dim=32, seed=0):
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


def clustered_rows(n, dim=32, clusters=40, seed=0):
    """Embeddings with structure, as a trained dual encoder's are (uniform random vectors have none for IVF)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=generator)
    rows = centres[torch.randint(clusters, (n,), generator=generator)] + 0.3 * torch.randn(n, dim, generator=generator)
    return torch.nn.functional.normalize(rows, dim=1)


def exact(queries, images, k):
    return (queries @ images.T).topk(k, dim=1).indices.numpy()


def test_faiss_flat_search_is_exact_and_matches_torch(monkeypatch):
    images, queries = unit_rows(500), unit_rows(20, seed=1)
    ranking = rank_by_similarity(queries, images, 10)
    assert isinstance(dense_search.faiss_index_for(images, approximate=False), faiss.IndexFlatIP)
    np.testing.assert_array_equal(ranking.positions, exact(queries, images, 10))
    monkeypatch.setattr(dense_search, "_faiss", lambda: None)  # where faiss is not installed: torch, same answer
    again = rank_by_similarity(queries, images, 10)
    np.testing.assert_array_equal(again.positions, ranking.positions)
    np.testing.assert_allclose(again.scores, ranking.scores, atol=1e-5)


def test_only_search_surfaces_go_approximate_and_only_past_the_threshold(monkeypatch):
    monkeypatch.setattr(dense_search, "APPROXIMATE_ABOVE", 1000)
    rows = clustered_rows(4050)  # queries from the same clusters as the images
    images, queries = rows[:4000].clone(), rows[4000:]
    assert isinstance(dense_search.faiss_index_for(images, approximate=True), faiss.IndexIVFFlat)
    assert isinstance(dense_search.faiss_index_for(images, approximate=False), faiss.IndexFlatIP)  # evaluation
    assert isinstance(dense_search.faiss_index_for(unit_rows(900), approximate=True), faiss.IndexFlatIP)
    approximate = rank_by_similarity(queries, images, 10, approximate=True).positions
    truth = exact(queries, images, 10)
    recall = np.mean([len(set(a) & set(t)) / 10 for a, t in zip(approximate, truth)])
    assert recall >= 0.9, recall


def test_fewer_images_than_k_pads_with_minus_one():
    ranking = rank_by_similarity(unit_rows(3, seed=3), unit_rows(4), 10)
    assert (ranking.positions[:, :4] >= 0).all() and (ranking.positions[:, 4:] == -1).all()
