"""Seq2SeqTrainer for generative image retrieval: every evaluation ranks with the trie-constrained beam search.

Hooks only (no hand-written loop): `evaluate` runs each query set under its own metric prefix (`eval_`, `seen_`,
`index_`), `prediction_step` returns each query's ranked index positions with (gold position, query id) as labels:
distributed evaluation pads the last batches with repeated queries, and the metrics drop repeats by query id, so
each query counts exactly once (reported as `<prefix>_num_queries`).
"""

from __future__ import annotations

import os

import torch
from transformers import Seq2SeqTrainer

from .dsi_data import DSICollator
from .metrics import compute_ranking_metrics
from .ranking import rank_by_generation, rank_by_similarity


class DSITrainer(Seq2SeqTrainer):
    def __init__(self, *args, eval_sets: dict | None = None, retrieval_k: int = 10, model_card_fn=None, **kwargs):
        kwargs.setdefault("compute_metrics", compute_ranking_metrics(mrr_k=10))
        kwargs.setdefault("eval_dataset", eval_sets)  # lets Trainer accept an eval_strategy
        super().__init__(*args, **kwargs)
        self.eval_sets = eval_sets or {}
        self.retrieval_k = retrieval_k
        self.model_card_fn = model_card_fn
        self._image_embeddings = None

    @property
    def is_dual_encoder(self) -> bool:
        return self.model.config.variant == "dual_encoder"

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval", **gen_kwargs):
        """With no dataset: every query set of the protocol, each under its prefix, in one metrics dict."""
        if self.is_dual_encoder:
            self._image_embeddings = self.embed_index()
        try:
            if eval_dataset is not None:
                return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix, **gen_kwargs)
            metrics = {}
            for prefix, dataset in self.eval_sets.items():
                metrics.update(super().evaluate(dataset, ignore_keys, prefix, **gen_kwargs))
            return metrics
        finally:
            self._image_embeddings = None

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Loggers group `eval_*` keys under eval/: the seen and indexing sets join them there (eval/seen_hits@1,
        eval/index_hits@1) instead of landing among training curves. Saved results keep their plain prefixes."""
        renamed = {(f"eval_{key}" if key.split("_", 1)[0] in self.eval_sets and not key.startswith("eval_") else key):
                   value for key, value in logs.items()}
        super().log(renamed, *args, **kwargs)

    @torch.no_grad()
    def embed_index(self) -> torch.Tensor:
        """Embeddings of every indexed image (dual encoder), in index order."""
        model = self.accelerator.unwrap_model(self.model)
        model.eval()
        collator: DSICollator = self.data_collator
        batches = collator.images.batches(collator.index.keys, collator.preprocessor,
                                          self.args.per_device_eval_batch_size,
                                          desc="Embedding indexed images" if self.is_world_process_zero() else None)
        return torch.cat([model.encode_images(pixels.to(self.args.device)) for pixels in batches])

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
        inputs = self._prepare_inputs(inputs)
        gold = inputs.pop("gold_index")
        query_id = inputs.pop("query_id")
        model = self.accelerator.unwrap_model(model)
        if self.is_dual_encoder:
            if "pixel_values" in inputs:
                queries = model.encode_images(inputs["pixel_values"])
            else:
                queries = model.encode_texts(inputs["input_ids"], inputs.get("attention_mask"))
            ranking = rank_by_similarity(queries, self._image_embeddings, self.retrieval_k)
        else:
            # the search settings are passed here, so evaluations during training search exactly as the final one
            ranking = rank_by_generation(model, model.image_index, self.retrieval_k, **inputs)
        positions = torch.as_tensor(ranking.positions, device=gold.device)
        return None, positions, torch.stack([gold, query_id], dim=1)

    def create_model_card(self, *args, **kwargs):
        """Our card (variant, identifiers, data, metrics, how to load and retrieve), not Trainer's generic one."""
        if self.model_card_fn is not None and self.is_world_process_zero():
            text = self.model_card_fn()
            with open(os.path.join(self.args.output_dir, "README.md"), "w", encoding="utf-8") as f:
                f.write(text)
        elif self.model_card_fn is None:
            super().create_model_card(*args, **kwargs)


__all__ = ["DSITrainer"]
