"""Text (or image) -> indexed images from a trained checkpoint: the object users load with `from_pretrained` and call.

It answers like the checkpoint's `text-to-image-retrieval` pipeline (same results, same `top_k`, `rerank`,
`image_dir` and result keys) without going through `transformers.pipeline`.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ..checkpoint.ranking import DenseReranker, rank_queries
from ..checkpoint.checkpoint_io import NO_IMAGE_INDEX, cannot_rerank_a_dual_encoder
from ..checkpoint.image_index_files import EMBEDDINGS_FILE_NAME
from ..checkpoint.loading import RERANKER_SUBFOLDER, load_dsi_model, resolve_reranker
from ..checkpoint.modeling_vit_t5_dsi import ViTT5DSIPreTrainedModel
from ..checkpoint.pipeline_text_to_image_retrieval import _is_image
from ..checkpoint.processing_vit_t5_dsi import ViTT5DSIProcessor


class DSIRetriever:
    """`DSIRetriever.from_pretrained(ckpt).search("a red circle", top_k=10)` -> `[{"image_key", "score", "path"}]`.

    Text queries of a generative checkpoint are re-ranked by its own dual encoder (`dual_encoder/`, locally or on
    the Hub) when it carries one, as in the pipeline and the app; `rerank=False` turns it off, `rerank_with=` names
    another dual-encoder checkpoint. Scores are then the fused log-probabilities (see `DenseReranker` in
    `checkpoint/ranking.py`)."""

    def __init__(self, model: ViTT5DSIPreTrainedModel, processor: ViTT5DSIProcessor,
                 reranker: DenseReranker | None = None, image_dir: str | None = None):
        index = model.image_index
        if index is None:
            raise ValueError(NO_IMAGE_INDEX)
        if model.config.is_dual_encoder and index.embeddings is None:
            raise ValueError(f"A dual-encoder retriever needs the indexed images' embeddings ({EMBEDDINGS_FILE_NAME}).")
        index.check_tokenizer(processor.tokenizer)
        self.model, self.processor, self.image_dir = model.eval(), processor, image_dir
        self.image_embeddings = index.embeddings.to(model.device) if index.embeddings is not None else None
        if reranker is not None:
            if model.config.is_dual_encoder:
                raise ValueError(cannot_rerank_a_dual_encoder("A reranker"))
            reranker.to(model.device).embeddings_for(index)  # every indexed image must have a dense embedding
        self.reranker = reranker

    @classmethod
    def from_pretrained(cls, name_or_path: str, device: str | torch.device | None = None, rerank: bool | None = None,
                        rerank_with: str | None = None, rerank_weight: float = 0.5, image_dir: str | None = None,
                        **hub_kwargs) -> "DSIRetriever":
        """Model, image index, processor and re-ranker of a checkpoint (a directory or a Hub repo). `hub_kwargs`
        (`revision`, `token`, `cache_dir`, `subfolder`, ...) reach every download, the re-ranker's included.
        `rerank`: None re-ranks when the checkpoint carries `dual_encoder/`, False never, True demands it.
        `image_dir`: where the collection's images are now, when they moved since indexing."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = load_dsi_model(name_or_path, **hub_kwargs)
        processor = ViTT5DSIProcessor.from_pretrained(name_or_path, **hub_kwargs)
        reranker = resolve_reranker(name_or_path, model.config, rerank, rerank_with, rerank_weight, **hub_kwargs)
        return cls(model.to(device), processor, reranker, image_dir)

    @property
    def image_index(self):
        return self.model.image_index

    @torch.no_grad()
    def search(self, queries, top_k: int = 10, rerank: bool | None = None, image_dir: str | None = None,
               batch_size: int = 32):
        """Up to `top_k` distinct indexed images per query, best first, as the pipeline returns them:
        `[{"image_key", "score", "path"}]` for one query (a string or a PIL image / HxWxC array), one such list
        per query for a list. `rerank=False` skips the re-ranker for this call; `path` is None when the image file
        is not on this machine (pass `image_dir`)."""
        single = isinstance(queries, str) or _is_image(queries)
        queries = [queries] if single else list(queries)
        if not queries:
            raise ValueError("An empty list of queries.")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}.")
        if rerank and self.reranker is None:
            raise ValueError(f"rerank=True: no dual encoder to re-rank with (the checkpoint has no "
                             f"{RERANKER_SUBFOLDER}/ folder, or it was loaded with rerank=False).")
        reranker = None if rerank is False else self.reranker
        texts, images = [], []
        for i, query in enumerate(queries):
            if isinstance(query, str):
                if not query.strip():
                    raise ValueError(f"Query #{i} is empty: type a caption, or pass an image.")
                texts.append(i)
            elif _is_image(query):
                images.append(i)
            else:
                raise TypeError(f"Query #{i}: a query is a string or an image (PIL or an HxWxC array), not "
                                f"{type(query).__name__}.")
        index, results = self.image_index, [None] * len(queries)
        for positions, is_text in ((texts, True), (images, False)):
            for start in range(0, len(positions), batch_size):
                chunk = positions[start:start + batch_size]
                if is_text:
                    batch = self.processor(text=[queries[i] for i in chunk]).to(self.model.device)
                    ranking = rank_queries(self.model, index, top_k, batch["input_ids"], batch["attention_mask"],
                                           image_embeddings=self.image_embeddings, reranker=reranker, approximate=True,
                                           texts=[queries[i] for i in chunk])
                else:
                    pixels = self.processor(images=[queries[i] for i in chunk])["pixel_values"].to(self.model.device)
                    ranking = rank_queries(self.model, index, top_k, pixel_values=pixels,
                                           image_embeddings=self.image_embeddings, approximate=True)
                for i, row, scores in zip(chunk, ranking.positions, ranking.scores):
                    results[i] = [{"image_key": index.keys[p], "score": float(s),
                                   "path": index.image_path(p, image_dir or self.image_dir)}
                                  for p, s in zip(row.tolist(), scores.tolist()) if p >= 0]
        return results[0] if single else results

    def retrieve(self, texts: list[str] | str, top_k: int = 10, batch_size: int = 32, rerank: bool | None = None,
                 k: int | None = None) -> list[list[tuple[str, float]]]:
        """`search` for texts, compactly: per text, [(image_key, score)] best first. (`k` is the old name of
        `top_k`.)"""
        if k is not None:
            warnings.warn("DSIRetriever.retrieve(k=...) is deprecated: use top_k=.", FutureWarning, stacklevel=2)
            top_k = k
        texts = [texts] if isinstance(texts, str) else list(texts)
        return [[(hit["image_key"], hit["score"]) for hit in hits]
                for hits in self.search(texts, top_k, rerank=rerank, batch_size=batch_size)]

    def dense_image_embeddings(self) -> tuple[list[str], np.ndarray]:
        """(keys, embeddings): the dual encoder's L2-normalised image embeddings, one row per indexed image in this
        index's order (what `--semantic_embeddings FILE.npy` reads). The checkpoint's own for a dual encoder, its
        re-ranker's for a generative checkpoint."""
        if self.image_embeddings is not None:
            embeddings = self.image_embeddings
        elif self.reranker is not None:
            embeddings = self.reranker.embeddings_for(self.image_index)
        else:
            raise ValueError(f"A generative checkpoint without a dual encoder ({RERANKER_SUBFOLDER}/ folder or "
                             "rerank_with=) has no image embeddings to export.")
        return list(self.image_index.keys), embeddings.detach().float().cpu().numpy()

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


__all__ = ["DSIRetriever"]
