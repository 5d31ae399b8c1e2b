"""Text -> images from a trained checkpoint: the object users load with `from_pretrained` and call."""

from __future__ import annotations

import torch

from .checkpoint.dense_reranking import DenseReranker
from .checkpoint.image_index_files import EMBEDDINGS_FILE_NAME
from .checkpoint.loading import load_dense_reranker, load_dsi_model
from .checkpoint.modeling_vit_t5_dsi import ViTT5DSIPreTrainedModel
from .checkpoint.processing_vit_t5_dsi import ViTT5DSIProcessor
from .checkpoint.ranking import rank_queries


class DSIRetriever:
    """`DSIRetriever.from_pretrained(dir).retrieve(["a red circle"], k=10)` -> per query [(image_key, score)].

    `reranker` (a `DenseReranker`, or `rerank_with=` a dual-encoder checkpoint in `from_pretrained`) re-orders a
    generative model's top-k by the dual encoder's similarity; scores are then the fused log-probabilities."""

    def __init__(self, model: ViTT5DSIPreTrainedModel, processor: ViTT5DSIProcessor,
                 reranker: DenseReranker | None = None):
        index = model.image_index
        if index is None:
            raise ValueError("This model has no image index (image_index.json): it was never trained on a collection.")
        if model.config.variant == "dual_encoder" and index.embeddings is None:
            raise ValueError(f"A dual-encoder retriever needs the indexed images' embeddings ({EMBEDDINGS_FILE_NAME}).")
        index.check_tokenizer(processor.tokenizer)
        self.model, self.processor = model.eval(), processor
        self.image_embeddings = index.embeddings.to(model.device) if index.embeddings is not None else None
        if reranker is not None:
            if model.config.variant == "dual_encoder":
                raise ValueError("A reranker re-orders a generative model's top-k; the dual encoder ranks by itself.")
            reranker.to(model.device).embeddings_for(index)  # every indexed image must have a dense embedding
        self.reranker = reranker

    @classmethod
    def from_pretrained(cls, name_or_path: str, device: str | torch.device | None = None,
                        rerank_with: str | None = None, rerank_weight: float = 0.5, **hub_kwargs) -> "DSIRetriever":
        """Model, image index and processor of a checkpoint (a directory or a Hub repo). `hub_kwargs`
        (`revision`, `token`, `cache_dir`, `subfolder`, ...) reach every download. `rerank_with`: a dual-encoder
        checkpoint that re-ranks the top-k (e.g. the `dual_encoder` folder a --dense_first run leaves)."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = load_dsi_model(name_or_path, **hub_kwargs)
        processor = ViTT5DSIProcessor.from_pretrained(name_or_path, **hub_kwargs)
        reranker = load_dense_reranker(rerank_with, rerank_weight) if rerank_with else None
        return cls(model.to(device), processor, reranker)

    @torch.no_grad()
    def caption(self, images, num_beams: int = 4, max_new_tokens: int = 32) -> list[str]:
        """One caption per PIL image (beam search), from a generative checkpoint trained with captioning."""
        if getattr(self.model.config, "caption_token_id", None) is None:
            raise ValueError("This checkpoint does not caption: train it with --captioning_ratio > 0.")
        images = images if isinstance(images, (list, tuple)) else [images]
        pixels = self.processor(images=list(images))["pixel_values"].to(self.model.device)
        tokens = self.model.caption(pixels, num_beams=num_beams, max_new_tokens=max_new_tokens)
        return [" ".join(text.split()) for text in self.processor.tokenizer.batch_decode(tokens,
                                                                                         skip_special_tokens=True)]

    @torch.no_grad()
    def retrieve(self, texts: list[str] | str, k: int = 10, batch_size: int = 32) -> list[list[tuple[str, float]]]:
        """Up to k distinct indexed images per text, best first, with scores (log-probability, cosine, or the fused
        log-probability when re-ranking)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}.")
        results = []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            batch = self.processor(text=chunk).to(self.model.device)
            ranking = rank_queries(self.model, self.model.image_index, k, batch["input_ids"], batch["attention_mask"],
                                   image_embeddings=self.image_embeddings, reranker=self.reranker, texts=chunk)
            results.extend(ranking.keys(self.model.image_index))
        return results


__all__ = ["DSIRetriever"]
