"""Dense re-ranking of the generative top-k: hand-computed orders, fusion weights, and bad inputs named."""

import numpy as np
import pytest
import torch

from conftest import tiny_config
from vit_t5_dsi.identifiers.build import build_image_index
from vit_t5_dsi import ImageIndex, ViTT5DSIDualEncoderModel, ViTT5DSIForConditionalGeneration, ViTT5DSIProcessor
from vit_t5_dsi.checkpoint.ranking import DenseReranker, Ranking

KEYS = [f"img{i}" for i in range(6)]


class FixedTexts:
    """Stands in for encode_texts: every query embeds to the same unit vector."""

    def __init__(self, vector):
        self.vector = torch.nn.functional.normalize(torch.as_tensor(vector, dtype=torch.float32), dim=0)

    def __call__(self, input_ids, attention_mask=None):
        return self.vector.expand(len(input_ids), -1)


@pytest.fixture
def reranker_parts(tokenizer):
    model = ViTT5DSIDualEncoderModel(tiny_config("dual_encoder", projection_dim=4)).eval()
    index = build_image_index(KEYS, tokenizer, "naive")
    # image j's embedding: cosine with the query vector e0 falls as j grows, except img4, the closest
    embeddings = torch.tensor([[1.0, 0.3 * j, 0, 0] for j in range(6)])
    embeddings[4] = torch.tensor([1.0, 0, 0, 0])
    index.embeddings = torch.nn.functional.normalize(embeddings, dim=1)
    model.image_index = index
    with torch.no_grad():
        model.logit_scale.fill_(np.log(10.0))
    model.encode_texts = FixedTexts([1.0, 0, 0, 0])
    return model, ViTT5DSIProcessor.for_model(model.config, tokenizer)


def test_weight_one_orders_the_beam_by_the_dual_encoder_alone(reranker_parts):
    model, processor = reranker_parts
    ranking = Ranking(np.array([[1, 4, 2, -1]]), np.array([[-0.1, -2.0, -3.0, -np.inf]], dtype=np.float32))
    reranked = DenseReranker(model, processor, weight=1.0).rerank(ranking, ["a query"], model.image_index)
    assert reranked.positions.tolist() == [[4, 1, 2, -1]]  # only the beam's candidates, empty slot last
    assert np.isneginf(reranked.scores[0, 3]) and (np.diff(reranked.scores[0, :3]) <= 0).all()


def test_weight_zero_keeps_the_generative_order(reranker_parts):
    model, processor = reranker_parts
    ranking = Ranking(np.array([[1, 4, 2]]), np.array([[-0.1, -2.0, -3.0]], dtype=np.float32))
    reranked = DenseReranker(model, processor, weight=0.0).rerank(ranking, ["a query"], model.image_index)
    assert reranked.positions.tolist() == [[1, 4, 2]]


def test_fused_scores_hand_computed(reranker_parts):
    model, processor = reranker_parts
    generative = np.array([[-0.5, -1.5]], dtype=np.float32)
    ranking = Ranking(np.array([[3, 4]]), generative)
    reranked = DenseReranker(model, processor, weight=0.5).rerank(ranking, ["q"], model.image_index)
    cosine = (model.image_index.embeddings[[3, 4]] @ torch.tensor([1.0, 0, 0, 0])).numpy()
    dense = 10.0 * cosine
    log_softmax = lambda x: x - np.log(np.exp(x - x.max()).sum()) - x.max()  # noqa: E731
    fused = 0.5 * log_softmax(generative[0].astype(np.float64)) + 0.5 * log_softmax(dense.astype(np.float64))
    order = np.argsort(-fused)
    assert fused[1] > fused[0]  # the dense score (img4 is the closest) outweighs the beam's preference here
    assert reranked.positions[0].tolist() == [[3, 4][i] for i in order] == [4, 3]
    np.testing.assert_allclose(reranked.scores[0], fused[order], rtol=1e-5)


def test_a_query_with_no_valid_candidate_stays_empty(reranker_parts):
    model, processor = reranker_parts
    ranking = Ranking(np.array([[-1, -1]]), np.full((1, 2), -np.inf, dtype=np.float32))
    reranked = DenseReranker(model, processor).rerank(ranking, ["q"], model.image_index)
    assert reranked.positions.tolist() == [[-1, -1]] and not np.isnan(reranked.scores).any()


def test_bad_rerankers_are_refused(reranker_parts, tokenizer):
    model, processor = reranker_parts
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        DenseReranker(model, processor, weight=1.5)
    generative = ViTT5DSIForConditionalGeneration(tiny_config())
    with pytest.raises(ValueError, match="dual_encoder checkpoint"):
        DenseReranker(generative, processor)
    other = build_image_index(KEYS + ["img_new"], tokenizer, "naive")
    with pytest.raises(ValueError, match="no embedding for 1 of the 7 indexed images"):
        DenseReranker(model, processor).embeddings_for(other)
    model.image_index.embeddings = None
    with pytest.raises(ValueError, match="no image embeddings"):
        DenseReranker(model, processor)


def test_query_count_must_match(reranker_parts):
    model, processor = reranker_parts
    ranking = Ranking(np.array([[1, 2]]), np.zeros((1, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="2 query texts for 1 ranked queries"):
        DenseReranker(model, processor).rerank(ranking, ["a", "b"], model.image_index)
