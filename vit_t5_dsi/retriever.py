"""Text -> images from a trained checkpoint: the object users load with `from_pretrained` and call."""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from .modeling_vit_t5_dsi import ViTT5DSIPreTrainedModel, load_dsi_model
from .ranking import rank_by_generation, rank_by_similarity

IMAGE_EMBEDDINGS_FILE = "image_embeddings.safetensors"


def save_image_embeddings(directory: str, embeddings: torch.Tensor) -> None:
    """The dual encoder's index: one embedding per indexed image, in index order (atomic write)."""
    path = os.path.join(directory, IMAGE_EMBEDDINGS_FILE)
    tmp = path + ".tmp"
    save_file({"image_embeddings": embeddings.detach().float().cpu().contiguous()}, tmp)
    os.replace(tmp, path)


class DSIRetriever:
    """`DSIRetriever.from_pretrained(dir).retrieve(["a red circle"], k=10)` -> per query [(image_key, score)]."""

    def __init__(self, model: ViTT5DSIPreTrainedModel, tokenizer, image_embeddings: torch.Tensor | None = None,
                 max_caption_length: int = 64):
        if model.image_index is None:
            raise ValueError("This model has no image index (image_index.json): it was never trained on a collection.")
        if model.config.variant == "dual_encoder" and image_embeddings is None:
            raise ValueError(f"A dual-encoder retriever needs the indexed images' embeddings ({IMAGE_EMBEDDINGS_FILE}).")
        model.image_index.check_tokenizer(tokenizer)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.image_embeddings = image_embeddings
        self.max_caption_length = max_caption_length

    @classmethod
    def from_pretrained(cls, name_or_path: str, device: str | torch.device | None = None) -> "DSIRetriever":
        model = load_dsi_model(name_or_path)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        embeddings = None
        if model.config.variant == "dual_encoder":
            path = os.path.join(name_or_path, IMAGE_EMBEDDINGS_FILE)
            if not os.path.exists(path):
                from huggingface_hub import hf_hub_download

                path = hf_hub_download(name_or_path, IMAGE_EMBEDDINGS_FILE)
            embeddings = load_file(path)["image_embeddings"].to(device)
        return cls(model.to(device), AutoTokenizer.from_pretrained(name_or_path), embeddings)

    @torch.no_grad()
    def retrieve(self, texts: list[str] | str, k: int = 10, batch_size: int = 32) -> list[list[tuple[str, float]]]:
        """Up to k distinct indexed images per text, best first, with scores (log-probability, or cosine)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}.")
        results = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                                   max_length=self.max_caption_length, return_tensors="pt").to(self.model.device)
            if self.image_embeddings is not None:
                queries = self.model.encode_texts(batch["input_ids"], batch["attention_mask"])
                ranking = rank_by_similarity(queries, self.image_embeddings, k)
            else:
                ranking = rank_by_generation(self.model, self.model.image_index, k, input_ids=batch["input_ids"],
                                             attention_mask=batch["attention_mask"])
            results.extend(ranking.keys(self.model.image_index))
        return results


__all__ = ["DSIRetriever", "save_image_embeddings", "IMAGE_EMBEDDINGS_FILE"]
