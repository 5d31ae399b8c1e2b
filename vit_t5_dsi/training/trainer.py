"""Seq2SeqTrainer for generative image retrieval: every evaluation ranks with the trie-constrained beam search.

Hooks only (no hand-written loop). The trainer works with what it is given: a model that holds its
`image_index`, the processor (`processing_class`, saved into every checkpoint), the collection's images and the
query sets. `evaluate` runs each query set under its own metric prefix (`eval_`, `seen_`, `index_`);
`prediction_step` returns each query's ranked index positions and scores with (gold position, query id) as labels:
distributed evaluation pads the last batches with repeated queries, and the metrics drop repeats by query id, so
each query counts exactly once (reported as `<prefix>_num_queries`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil

import datasets
import torch
from transformers import Seq2SeqTrainer, TrainerCallback
from transformers.trainer_pt_utils import nested_gather

from ..data.rows import DSICollator, ImageSource
from ..data.splits import sample_rows
from ..checkpoint.checkpoint_io import atomic_write_text, cannot_rerank_a_dual_encoder, disk_full_error
from . import fault_points
from .distributed import local_process_count
from .hub_push import HubPushMessages
from .image_embeddings import embed_images
from .metrics import caption_metrics, compute_ranking_metrics, reported_ks
from .model_card import example_query, render_model_card
from .predictions import PREDICTIONS_FILE, write_predictions
from .pseudo_queries import REFRESH_STATE_FILE, epoch_index, generate_captions
from .resume import RESUME_STATE_FILE, CheckpointMismatchError, checkpoint_is_complete, load_checkpoint_weights
from ..checkpoint.ranking import rank_queries

logger = logging.getLogger(__name__)

# Files of a checkpoint that only resume training; everything else in it is the model a user loads.
RESUME_ONLY_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json", "training_args.bin",
                     RESUME_STATE_FILE, REFRESH_STATE_FILE)


class CollatorEpoch(TrainerCallback):
    """Tells the collator which epoch starts, for its per-row augmentation seeds (DataLoader workers copy the
    collator when an epoch's iterator is made, after this)."""

    def __init__(self, collator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.epoch = epoch_index(state)


class FaultPointsCallback(TrainerCallback):
    """`fault_points` between optimizer steps (only added when VIT_T5_DSI_KILL_AT is set)."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def on_step_end(self, args, state, control, **kwargs):
        fault_points.reached(self.prefix + "step")


class DSITrainer(HubPushMessages, Seq2SeqTrainer):
    """`DSITrainer(model, args, images=ImageSource(...), processing_class=processor, train_dataset=...,
    eval_dataset={"eval": queries, ...})`. The collator is built from the model's index, the images and the
    processor unless one is given; `args.retrieval_k` (default 10) sets the beams and the reported Hits@k."""

    def __init__(self, model=None, args=None, *, images: ImageSource | None = None, augment: bool = False,
                 retrieval_k: int | None = None, pseudo_queries=None,
                 caption_references: dict[str, list[str]] | None = None, reranker=None,
                 image_cache_mb: float = 4096, queries_during_training: int = 0, **kwargs):
        """`pseudo_queries`: the `PseudoQueries` that fill pseudo-query rows (refreshed in place during training).
        `caption_references`: held-out image key -> its real captions; with a captioning model, every full
        evaluation also reports `eval_caption_bleu` and `eval_caption_exact` on those images. `reranker`: a
        `DenseReranker`; caption queries are then also ranked by it (metrics under `<prefix>_rerank_*`).
        `images`: an `ImageSource` of the indexed images; None evaluates caption queries only (a dual encoder
        then searches its stored embeddings). `image_cache_mb`: the machine's budget for decoded images, split
        between its training processes (`DecodedImages`). `queries_during_training`:
        evaluations during training rank at most this many queries per set (a fixed sample; 0 = all); the
        evaluation after training ranks them all."""
        if model is None or getattr(model, "image_index", None) is None:
            raise ValueError("DSITrainer needs a model with an image index (model.image_index = "
                             "ImageIndex.build(...)).")
        if kwargs.get("processing_class") is None:
            raise ValueError("DSITrainer needs processing_class=ViTT5DSIProcessor(...): every checkpoint saves it.")
        if args is not None and args.remove_unused_columns:
            logger.info("DSITrainer sets remove_unused_columns=False: its collator reads image_key/caption/kind.")
            args.remove_unused_columns = False
        self.retrieval_k = retrieval_k or getattr(args, "retrieval_k", 10)
        self.queries_during_training = queries_during_training
        if self.retrieval_k > len(model.image_index):
            raise ValueError(f"retrieval_k={self.retrieval_k} is larger than the {len(model.image_index)} indexed "
                             "images.")
        if kwargs.get("data_collator") is None:
            kwargs["data_collator"] = DSICollator(model.image_index, images, kwargs["processing_class"],
                                                  model.config.variant, augment=augment,
                                                  caption_token_id=getattr(model.config, "caption_token_id", None),
                                                  pseudo_queries=pseudo_queries,
                                                  image_cache_mb=image_cache_mb / local_process_count(),
                                                  seed=getattr(args, "seed", 42))
        kwargs.setdefault("compute_metrics", compute_ranking_metrics(reported_ks(self.retrieval_k),
                                                                     min(10, self.retrieval_k)))
        super().__init__(model=model, args=args, **kwargs)
        if hasattr(self.data_collator, "epoch"):
            self.add_callback(CollatorEpoch(self.data_collator))
        if os.environ.get(fault_points.KILL_AT_VARIABLE):
            self.add_callback(FaultPointsCallback(self._fault_prefix))
        self.images = images if images is not None else self.data_collator.images
        self.caption_references = caption_references or {}
        if reranker is not None and self.is_dual_encoder:
            raise ValueError(cannot_rerank_a_dual_encoder("A reranker"))
        self.reranker = reranker.to(self.args.device) if reranker is not None else None
        self._image_embeddings = None
        self._embedded_at_step = None

    @property
    def index(self):
        return self.accelerator.unwrap_model(self.model).image_index

    @property
    def is_dual_encoder(self) -> bool:
        return self.model.config.is_dual_encoder

    @property
    def _fault_prefix(self) -> str:  # the dense stage's moments are its own (fault_points)
        return "dense_" if self.is_dual_encoder else ""

    # ----- evaluation --------------------------------------------------------------------------------
    @property
    def eval_sets(self) -> dict[str, datasets.Dataset]:
        if isinstance(self.eval_dataset, dict):
            return self.eval_dataset
        return {"eval": self.eval_dataset} if self.eval_dataset is not None else {}

    @contextlib.contextmanager
    def _dense_index(self):
        """The dual encoder searches embeddings of the current weights, computed here, where they are used."""
        if self.is_dual_encoder:
            self._image_embeddings = self._current_index_embeddings().to(self.args.device)
        try:
            yield
        finally:
            self._image_embeddings = None

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval", **gen_kwargs):
        """With no dataset: every query set of the protocol, each under its prefix, in one metrics dict.

        The random state is restored afterwards: each evaluation DataLoader draws its base seed from torch's
        global generator, which the training sampler and dropout read too, so evaluating during training used
        to change the model it trained (the demo's held-out Hits@1 moved from 0.750 to 0.617 with
        --eval_strategy steps). Evaluating now leaves training exactly as it would have been."""
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices), self._dense_index():
            if eval_dataset is not None:
                return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix, **gen_kwargs)
            metrics = {}
            for prefix, dataset in self.eval_sets.items():
                if self.is_in_train and 0 < self.queries_during_training < len(dataset):
                    dataset = sample_rows(dataset, self.queries_during_training, self.args.seed)
                metrics.update(super().evaluate(dataset, ignore_keys, prefix, **gen_kwargs))
            captions = self.evaluate_captions()
            if captions:
                self.log(captions)
                metrics.update(captions)
            return metrics

    def evaluate_captions(self) -> dict[str, float]:
        """`eval_caption_bleu` / `eval_caption_exact`: one beam-searched caption per held-out image against its
        real captions (empty when the model does not caption or no references were given)."""
        model = self.accelerator.unwrap_model(self.model)
        if not self.caption_references or getattr(model.config, "caption_token_id", None) is None:
            return {}
        keys = list(self.caption_references)
        captions = generate_captions(model, keys, self.images, self.processing_class,
                                     self.args.per_device_eval_batch_size, self.args.device)
        return {f"eval_{name}": value for name, value in caption_metrics(captions, self.caption_references).items()}

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test", **gen_kwargs):
        """Ranked index positions per query (`predictions`, (N, retrieval_k), -1 for an empty slot)."""
        with self._dense_index():
            output = super().predict(test_dataset, ignore_keys, metric_key_prefix, **gen_kwargs)
        return output._replace(predictions=output.predictions[0])  # the scores go to the predictions file

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix: str = "eval"):
        """After training (not during it), each set's per-query results go to `<set>_predictions.jsonl`."""
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if (getattr(self.args, "save_predictions", False) and not self.is_in_train and self.is_world_process_zero()
                and output.predictions is not None and metric_key_prefix in self.eval_sets):
            path = os.path.join(self.args.output_dir, PREDICTIONS_FILE.format(prefix=metric_key_prefix))
            count = write_predictions(path, dataloader.dataset, output.predictions, output.label_ids, self.index)
            logger.info("%d per-query results of %s written to %s", count, metric_key_prefix, path)
        return output

    def _get_dataloader(self, dataset, description, batch_size, sampler_fn=None, is_training=False,
                        dataloader_key=None):
        """Evaluation never drops a last partial batch (every query counts), whatever --dataloader_drop_last says.
        Trainer reads the flag from `args` inside this call, so it is switched off for the call alone."""
        drop_last = self.args.dataloader_drop_last
        if not is_training:
            self.args.dataloader_drop_last = False
        try:
            return super()._get_dataloader(dataset, description, batch_size, sampler_fn, is_training, dataloader_key)
        finally:
            self.args.dataloader_drop_last = drop_last

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Loggers group `eval_*` keys under eval/: the seen and indexing sets join them there (eval/seen_hits@1,
        eval/index_hits@1) instead of landing among training curves. Saved results keep their plain prefixes."""
        renamed = {(f"eval_{key}" if key.split("_", 1)[0] in self.eval_sets and not key.startswith("eval_") else key):
                   value for key, value in logs.items()}
        super().log(renamed, *args, **kwargs)

    def embed_index(self) -> torch.Tensor:
        """Embeddings of every indexed image, in index order (each process embeds its share)."""
        model = self.accelerator.unwrap_model(self.model)
        return embed_images(model, model.image_index.keys, self.images, self.processing_class,
                            self.args.per_device_eval_batch_size, self.args.device,
                            desc="Embedding indexed images" if not self.args.disable_tqdm else None)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
        inputs = self._prepare_inputs(inputs)
        gold = inputs.pop("gold_index")
        query_id = inputs.pop("query_id")
        texts = inputs.pop("query_text", None)
        model = self.accelerator.unwrap_model(model)
        if self.is_dual_encoder and self._image_embeddings is None:
            raise RuntimeError("Dual-encoder predictions need the index embeddings: call evaluate() or predict().")
        # both rankings are kept (pure and re-ranked), so the re-ranker is applied below rather than in rank_queries
        ranking = rank_queries(model, model.image_index, self.retrieval_k, image_embeddings=self._image_embeddings
                               if self.is_dual_encoder else None, **inputs)
        positions = torch.as_tensor(ranking.positions, device=gold.device)
        scores = torch.as_tensor(ranking.scores, device=gold.device)
        if self.reranker is not None and texts is not None:
            reranked = self.reranker.rerank(ranking, texts, model.image_index)
            positions = torch.stack([positions, torch.as_tensor(reranked.positions, device=gold.device)], dim=1)
            scores = torch.stack([scores, torch.as_tensor(reranked.scores, device=gold.device)], dim=1)
        fault_points.reached(self._fault_prefix + "evaluation")
        return None, (positions, scores), torch.stack([gold, query_id], dim=1)

    # ----- resuming ----------------------------------------------------------------------------------
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Resume (and `load_best_model_at_end`) load weights as `from_pretrained` does; see
        `load_checkpoint_weights`."""
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        load_checkpoint_weights(target, resume_from_checkpoint)
        self._resumed_loss = self._saved_loss_total(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        logger.info("Loading the best model from %s (score %s).", self.state.best_model_checkpoint,
                    self.state.best_metric)
        load_checkpoint_weights(self.accelerator.unwrap_model(self.model), self.state.best_model_checkpoint)

    @staticmethod
    def _saved_loss_total(checkpoint: str) -> float | None:
        path = os.path.join(checkpoint, RESUME_STATE_FILE)
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("total_loss")

    def _save_checkpoint(self, model, trial) -> None:
        """Trainer's checkpoint, then the state of callbacks that keep some (pseudo-queries), then
        `dsi_trainer_state.json` last: the training loss summed so far (Trainer reports `train_loss` as the mean
        over one `train()` call, so a resumed run would report the mean of its last part only) and the mark that
        the checkpoint is complete. A run killed while saving leaves a folder without it, which resuming refuses
        (`checkpoint_is_complete`). A save that fails (a full disk) removes its half-written folder and names it."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        try:
            super()._save_checkpoint(model, trial)
            # the steps not yet logged, averaged over processes as Trainer's logging does (a collective)
            pending = nested_gather(self._tr_loss.detach(), self.args.parallel_mode).mean().item()
            fault_points.reached(self._fault_prefix + "checkpoint_save")  # Trainer's files written, no mark yet
            if self.is_world_process_zero():
                for callback in self.callback_handler.callbacks:
                    if hasattr(callback, "save_to_checkpoint"):
                        callback.save_to_checkpoint(folder)
                atomic_write_text(os.path.join(folder, RESUME_STATE_FILE),
                                  json.dumps({"total_loss": self._total_loss_scalar + pending}))
        except Exception as err:
            if self.is_world_process_zero() and not checkpoint_is_complete(folder):
                shutil.rmtree(folder, ignore_errors=True)
            full = disk_full_error(err, folder)
            if full is not None and full is not err:
                raise full from err
            raise

    def _finalize_training(self, trial, num_train_samples, start_time):
        """A resumed run's `train_loss` is the mean over every step of the run, as if it had not been interrupted."""
        resumed = getattr(self, "_resumed_loss", None)
        if resumed is not None:
            self._total_loss_scalar += resumed
            self._initial_global_step = 0
        output = super()._finalize_training(trial, num_train_samples, start_time)
        self._resumed_loss = None
        return output

    # ----- saving and pushing ---------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The model's own `save_pretrained` writes weights, config, code and the image index; for the dual encoder
        the index first gets the embeddings of the weights being saved, so every checkpoint searches on its own."""
        if self.is_dual_encoder:
            self.index.embeddings = self._current_index_embeddings()
        if _internal_call:  # a checkpoint's save (fault_points): before the model is written, and after
            fault_points.reached(self._fault_prefix + "checkpoint_save")
        with self.push_deferred(not _internal_call):  # Trainer pushes after a final save (hub_push)
            super().save_model(output_dir, _internal_call)
        if _internal_call:
            fault_points.reached(self._fault_prefix + "checkpoint_save")

    def _current_index_embeddings(self) -> torch.Tensor:
        """The index embeddings of the weights at this training step, computed once per step: the final save
        and the final evaluation (or a save and an evaluation at the same step) share them."""
        step = self.state.global_step
        if self.images is None:  # evaluation without the collection: the checkpoint's own embeddings
            if self.index.embeddings is None:
                raise ValueError("A dual encoder evaluated without its images needs its stored embeddings.")
            return self.index.embeddings
        if self._embedded_at_step != step or self.index.embeddings is None:
            self.index.embeddings, self._embedded_at_step = self.embed_index(), step
        return self.index.embeddings

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Trainer copies only weights and config from a checkpoint before pushing `output_dir`; the pushed repo
        must also get the code files, the image index and the embeddings, so every model file is copied."""
        if self.is_world_process_zero() and os.path.isdir(checkpoint_folder):
            for name in os.listdir(checkpoint_folder):
                source = os.path.join(checkpoint_folder, name)
                if os.path.isfile(source) and name not in RESUME_ONLY_FILES and not name.startswith("rng_state"):
                    shutil.copy(source, os.path.join(self.args.output_dir, name))
        super()._push_from_checkpoint(checkpoint_folder)

    def create_model_card(self, model_name: str | None = None, dataset: str | None = None,
                          dataset_tags: str | list[str] | None = None, **kwargs) -> None:
        """Our card (variant, identifiers, data, metrics from `all_results.json`, how to load and retrieve), not
        Trainer's generic one. `dataset` describes the collection; `push_to_hub(dataset=...)` passes it here."""
        if not self.is_world_process_zero():
            return
        results_path = os.path.join(self.args.output_dir, "all_results.json")
        metrics = {}
        if os.path.exists(results_path):
            with open(results_path, encoding="utf-8") as f:
                metrics = json.load(f)
        model = self.accelerator.unwrap_model(self.model)
        args = self.args
        training = (f"{args.num_train_epochs:g} epochs (max_steps {args.max_steps})" if args.max_steps > 0 else
                    f"{args.num_train_epochs:g} epochs")
        training += (f", batch {args.per_device_train_batch_size} x {args.world_size} processes, "
                     f"lr {args.learning_rate:g}")
        store = getattr(self.data_collator, "pseudo_queries", None)
        if store is not None and len(store):
            summary = store.summary()
            training += (f"; {summary['num_pseudo_queries']} pseudo-queries for {summary['num_images']} images "
                         f"({summary['per_image_min']}-{summary['per_image_max']} per image) from {summary['source']}")
        name = model_name or os.path.basename(os.path.abspath(args.output_dir))
        tags = [dataset_tags] if isinstance(dataset_tags, str) else dataset_tags
        # the repo the card is pushed to (Trainer resolves "name" to "user/name"), else the directory it lies in
        where = getattr(self, "hub_model_id", None) or args.hub_model_id or args.output_dir
        text = render_model_card(model, metrics, name, where,
                                 dataset or f"a collection of {len(model.image_index)} images", training,
                                 tags[0] if tags else None, example_query=example_query(self.eval_sets))
        atomic_write_text(os.path.join(args.output_dir, "README.md"), text)


__all__ = ["DSITrainer", "RESUME_ONLY_FILES", "CheckpointMismatchError", "load_checkpoint_weights",
           "checkpoint_is_complete"]
