"""The `text-to-image-retrieval` pipeline task: a caption (or an image) in, the best indexed images out.

    from transformers import pipeline
    search = pipeline("text-to-image-retrieval", model=CKPT, trust_remote_code=True)
    search("a red circle", top_k=5)     # [{"image_key": ..., "score": ..., "path": ...}, ...]
    search("a red circle", top_k=5, rerank=False)  # the beam's own order, without the dual encoder

Every checkpoint this library writes carries this file and names it in `config.custom_pipelines`, so the call above
works wherever transformers is installed (the file is then loaded as the checkpoint's own code). It only imports
transformers, torch, PIL and sibling modules that `save_pretrained` copies next to it.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import Pipeline

from .checkpoint_io import NO_IMAGE_INDEX
from .configuration_vit_t5_dsi import RETRIEVAL_TASK
from .loading import RERANKER_SUBFOLDER, resolve_reranker
from .processing_vit_t5_dsi import clean_text, upright_rgb
from .ranking import rank_queries

TASK = RETRIEVAL_TASK


def _is_image(query) -> bool:
    if isinstance(query, np.ndarray):
        return True
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - PIL ships with the image processor's dependencies
        return False
    return isinstance(query, Image.Image)


class TextToImageRetrievalPipeline(Pipeline):
    """Top-k indexed images per query, best first: `[{"image_key", "score", "path"}]` (plus `"image"`, a PIL
    image, with `return_images=True`).

    A text query is answered like the model was evaluated: constrained beam search over the identifiers that exist
    (generative variants; the score is the id's log-probability) or a dot product with every indexed image's
    embedding (dual encoder; the score is the cosine). An image query (a PIL image or an HxWxC array) goes through
    the model's image side: it is indexed (image -> id) and the ids it would get are returned, so the first hit of
    an indexed image is normally itself. `path` is the image file recorded with the index (under `image_dir` when
    given: the collection moved, or the checkpoint came from the Hub), or None when no such file exists here.
    A list of queries returns one list per query; `batch_size=` batches them (texts and images in separate calls).

    Re-ranking (text queries of a generative model): when the checkpoint carries its dual encoder (the
    `dual_encoder/` folder a default run trains first, locally or in the Hub repo), the top-k is re-ordered by the
    fused score of `rerank_weight` (see `DenseReranker` in `ranking.py`) and the score is that fused log-probability.
    `rerank=False` (at load or per call) keeps the beam's order; `rerank_with=` names another dual-encoder
    checkpoint; `rerank=True` fails when there is none.
    """

    _load_processor = True
    _load_tokenizer = False
    _load_image_processor = False
    _load_feature_extractor = False

    def __init__(self, *args, image_dir: str | None = None, rerank: bool | None = None,
                 rerank_with: str | None = None, rerank_weight: float = 0.5, **kwargs):
        super().__init__(*args, **kwargs)
        if self.processor is None:
            raise ValueError(f"The {TASK} pipeline needs the checkpoint's processor (processor_config.json).")
        index = getattr(self.model, "image_index", None)
        if index is None:
            raise ValueError(NO_IMAGE_INDEX)
        # transformers pads batched inputs with these two
        self.tokenizer = self.tokenizer or self.processor.tokenizer
        self.image_processor = self.image_processor or self.processor.image_processor
        index.check_tokenizer(self.tokenizer)
        dense = self.model.config.is_dual_encoder
        if dense and index.embeddings is None:
            raise ValueError("A dual-encoder checkpoint needs its indexed images' embeddings "
                             "(image_embeddings.safetensors) to retrieve.")
        self.image_embeddings = index.embeddings.to(self.device) if dense else None  # the dense search index
        self.image_dir = image_dir
        # the checkpoint's own dual_encoder/ from the same Hub commit as the model (pipeline() resolves revisions)
        revision = getattr(self.model.config, "_commit_hash", None)
        self.reranker = resolve_reranker(getattr(self.model, "name_or_path", None), self.model.config, rerank,
                                         rerank_with, rerank_weight, **({"revision": revision} if revision else {}))
        if self.reranker is not None:
            self.reranker.to(self.device).embeddings_for(index)  # every indexed image needs a dense embedding

    def __call__(self, inputs, *args, **kwargs):
        if isinstance(inputs, (list, tuple)):
            if not inputs:
                raise ValueError("An empty list of queries.")
            if (kwargs.get("batch_size") or 1) > 1 and len({isinstance(q, str) for q in inputs}) > 1:
                raise ValueError("Batch text and image queries in separate calls (their model inputs differ).")
        return super().__call__(inputs, *args, **kwargs)

    @property
    def image_index(self):
        return self.model.image_index

    def _sanitize_parameters(self, top_k=None, return_images=None, image_dir=None, rerank=None, **kwargs):
        if kwargs:
            raise TypeError(f"{TASK}: unexpected arguments {sorted(kwargs)} (top_k, rerank, return_images, "
                            "image_dir, batch_size are understood).")
        forward = {}
        if top_k is not None:
            if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
                raise ValueError(f"top_k must be a positive integer, got {top_k!r}.")
            forward["top_k"] = top_k
        if rerank is not None:
            if rerank and self.reranker is None:
                raise ValueError(f"rerank=True: no dual encoder to re-rank with (the checkpoint has no "
                                 f"{RERANKER_SUBFOLDER}/ folder, or the pipeline was loaded with rerank=False).")
            forward["rerank"] = bool(rerank)
        postprocess = {}
        if return_images is not None:
            postprocess["return_images"] = bool(return_images)
        if image_dir is not None:
            postprocess["image_dir"] = image_dir
        return {}, forward, postprocess

    def preprocess(self, query):
        if isinstance(query, str):  # control characters removed, any length (the processor truncates)
            query, _ = clean_text(query)
            if not query:
                raise ValueError("An empty query: type a caption, or pass an image.")
            encoded = self.processor(text=[query])
            return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "query": query}
        if _is_image(query):  # upright by its EXIF orientation, RGB from any mode
            image = upright_rgb(query) if not isinstance(query, np.ndarray) else query
            return {"pixel_values": self.processor(images=[image])["pixel_values"]}
        raise TypeError(f"{TASK}: a query is a string or an image (PIL or an HxWxC array), not {type(query).__name__}.")

    def _forward(self, model_inputs, top_k: int = 5, rerank: bool = True):
        texts = model_inputs.get("query")  # one string, or a list of them for a batch; None for images
        ranking = rank_queries(self.model, self.image_index, top_k, model_inputs.get("input_ids"),
                               model_inputs.get("attention_mask"), model_inputs.get("pixel_values"),
                               image_embeddings=self.image_embeddings, approximate=True,
                               reranker=self.reranker if rerank else None,
                               texts=[texts] if isinstance(texts, str) else texts)
        return {"positions": torch.from_numpy(ranking.positions), "scores": torch.from_numpy(ranking.scores)}

    def postprocess(self, model_outputs, return_images: bool = False, image_dir: str | None = None):
        index, image_dir = self.image_index, image_dir or self.image_dir
        results = []
        for position, score in zip(model_outputs["positions"][0].tolist(), model_outputs["scores"][0].tolist()):
            if position < 0:  # fewer distinct images than top_k
                continue
            result = {"image_key": index.keys[position], "score": float(score),
                      "path": index.image_path(position, image_dir)}
            if return_images:
                result["image"] = _load_image(result["path"])
            results.append(result)
        return results


def _load_image(path: str | None):
    if path is None:
        return None
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


__all__ = ["TextToImageRetrievalPipeline", "TASK"]
