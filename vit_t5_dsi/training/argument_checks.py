"""Refuse bad combinations of `run_dsi_image.py`'s flags before anything is loaded or written.

Each refusal is a `UsageError` that names the flags at fault, since users meet them on the command line.
"""

from __future__ import annotations

import os

from ..checkpoint.configuration_vit_t5_dsi import DUAL_ENCODER
from ..checkpoint.checkpoint_io import UsageError, cannot_rerank_a_dual_encoder
from .arguments import DataArguments, DSITrainingArguments, ModelArguments
from .recipe import OWN_DUAL_ENCODER, pseudo_query_epochs, pseudo_query_fractions


def check_arguments(model_args: ModelArguments, data_args: DataArguments,
                    training_args: DSITrainingArguments) -> None:
    """Refuse bad flag combinations before anything is loaded or written (UsageError, naming the flags)."""
    if (model_args.vision_model_name_or_path is None) != (model_args.text_model_name_or_path is None):
        raise UsageError("--vision_model_name_or_path and --text_model_name_or_path go together.")
    if model_args.model_name_or_path and model_args.vision_model_name_or_path:
        raise UsageError("--model_name_or_path (a vit-t5-dsi checkpoint) and --vision/--text_model_name_or_path "
                         "(parts to compose a new model from) exclude each other.")
    if model_args.reindex and not model_args.model_name_or_path:
        raise UsageError("--reindex only applies with --model_name_or_path.")
    given = [flag for flag, value in (("--karpathy_json", data_args.karpathy_json),
                                      ("--dataset_name", data_args.dataset_name),
                                      ("--train_file", data_args.train_file)) if value]
    if len(given) > 1:
        raise UsageError(f"Pass one data layout, not {' and '.join(given)}.")
    if data_args.karpathy_json and not data_args.image_dir:
        raise UsageError("--karpathy_json needs --image_dir (the directory its file names are relative to).")
    if data_args.validation_file and (data_args.karpathy_json or data_args.dataset_name):
        raise UsageError("--validation_file is the JSONL layout's (with --train_file), or alone with "
                         "--model_name_or_path to evaluate a checkpoint: not with --karpathy_json/--dataset_name.")
    if data_args.evaluates_query_file and (not model_args.model_name_or_path or training_args.do_train):
        raise UsageError("--validation_file without --train_file evaluates a trained checkpoint on its queries: pass "
                         "--model_name_or_path CKPT --do_train False (or --train_file to train on a JSONL "
                         "collection).")
    for flag, value, least, meaning in (  # numeric flags with a lower bound (None: not given)
            ("--max_index_eval_images", data_args.max_index_eval_images, 0, " (0 = no indexing evaluation)"),
            ("--max_train_samples", data_args.max_train_samples, 1, ""),
            ("--max_eval_samples", data_args.max_eval_samples, 1, ""),
            ("--eval_queries_during_training", data_args.eval_queries_during_training, 0, " (0 = all)"),
            ("--semantic_num_clusters", model_args.semantic_num_clusters, 2, ""),
            ("--semantic_max_leaf_size", model_args.semantic_max_leaf_size, 1, ""),
            ("--rq_num_levels", model_args.rq_num_levels, 1, ""),
            ("--rq_codes_per_level", model_args.rq_codes_per_level, 2, ""),
            ("--pseudo_query_filter_top_k", data_args.pseudo_query_filter_top_k, 0, " (0 = keep all)"),
            ("--pseudo_query_rows_per_image", data_args.pseudo_query_rows_per_image, 1, ""),
            ("--image_cache_mb", data_args.image_cache_mb, 0, " (0 = no cache)"),
            ("--num_pseudo_queries", data_args.num_pseudo_queries, 1, ""),
            ("--retrieval_k", training_args.retrieval_k, 1, "")):
        if value is not None and value < least:
            raise UsageError(f"{flag} must be >= {least}{meaning}, got {value}.")
    if data_args.indexing_ratio is not None and not 0.0 < data_args.indexing_ratio <= 1.0:
        raise UsageError(f"--indexing_ratio must be in (0, 1], got {data_args.indexing_ratio}.")
    generative = model_args.variant != DUAL_ENCODER
    if model_args.dense_first:
        if not generative:
            raise UsageError("--dense_first trains a dual encoder before a generative model: pass a generative "
                             "--variant.")
        if model_args.docid_scheme not in ("semantic", "rq"):
            raise UsageError(f"--dense_first builds ids from the dual encoder's embeddings: --docid_scheme "
                             f"{model_args.docid_scheme} does not use embeddings (use semantic or rq).")
        if model_args.semantic_embeddings or model_args.model_name_or_path:
            raise UsageError("--dense_first makes the id embeddings: it excludes --semantic_embeddings and "
                             "--model_name_or_path.")
        if training_args.resume_from_checkpoint is None and not training_args.do_train:
            raise UsageError("--dense_first needs --do_train (it trains two models).")
    if model_args.dense_first_epochs is not None and (not model_args.dense_first or model_args.dense_first_epochs <= 0):
        raise UsageError("--dense_first_epochs needs --dense_first and must be > 0, got "
                         f"{model_args.dense_first_epochs}.")
    if model_args.rerank_with not in (None, OWN_DUAL_ENCODER):
        if not generative:
            raise UsageError(cannot_rerank_a_dual_encoder("--rerank_with"))
        if model_args.rerank_with == "dense_first" and not model_args.dense_first:
            raise UsageError("--rerank_with dense_first needs --dense_first (the dual encoder that run trains).")
    if not 0.0 <= model_args.rerank_weight <= 1.0:
        raise UsageError(f"--rerank_weight must be in [0, 1], got {model_args.rerank_weight}.")
    if not 0.0 <= data_args.captioning_ratio <= 1.0:
        raise UsageError(f"--captioning_ratio must be in [0, 1], got {data_args.captioning_ratio}.")
    if data_args.captioning_ratio > 0 and model_args.variant == DUAL_ENCODER:
        raise UsageError("--captioning_ratio needs a generative variant: the dual encoder has no decoder.")
    if data_args.pseudo_query_epochs:
        if data_args.pseudo_queries:
            raise UsageError("--pseudo_query_epochs (pseudo-queries written during training) and --pseudo_queries "
                             "(a file of them) exclude each other.")
        if data_args.captioning_ratio <= 0:
            raise UsageError("--pseudo_query_epochs needs --captioning_ratio > 0: the model must learn to caption.")
        try:
            epochs = pseudo_query_epochs(data_args)
        except ValueError:
            raise UsageError(f"--pseudo_query_epochs {data_args.pseudo_query_epochs!r}: expected comma-separated "
                             "epoch numbers, e.g. '100,200'.") from None
        if any(e < 1 for e in epochs):
            raise UsageError(f"--pseudo_query_epochs must be >= 1 (captioning trains first), got {epochs}.")
    if pseudo_query_fractions(data_args):
        if data_args.pseudo_queries:
            raise UsageError("--pseudo_query_at (pseudo-queries written during training) and --pseudo_queries "
                             "(a file of them) exclude each other.")
        if data_args.captioning_ratio <= 0:
            raise UsageError("--pseudo_query_at needs --captioning_ratio > 0: the model must learn to caption.")
    if (data_args.pseudo_query_filter_top_k and generative and not model_args.dense_first
            and model_args.rerank_with is None):
        raise UsageError("--pseudo_query_filter_top_k needs a dual encoder to filter with: --dense_first or "
                         "--rerank_with.")
    if (training_args.dataloader_persistent_workers and training_args.dataloader_num_workers > 0
            and (data_args.augment or pseudo_query_epochs(data_args) or pseudo_query_fractions(data_args))):
        raise UsageError("--dataloader_persistent_workers keeps the first epoch's copy of the collator in every "
                         "worker, so its crops (--augment) and pseudo-queries would never change. Leave it off: the "
                         "image cache is shared by the workers and outlives them (--image_cache_mb).")
    if training_args.fp16 and model_args.variant != DUAL_ENCODER and not training_args.allow_fp16_t5:
        raise UsageError("--fp16 with T5 overflows (NaN losses): use --bf16, or fp32 on GPUs without bf16. "
                         "Pass --allow_fp16_t5 to try anyway.")
    # Seq2SeqTrainingArguments flags this script has no use for: refused, not silently ignored
    for flag, value, why in (
            ("--do_predict", training_args.do_predict,
             "there is no test split; --do_eval evaluates the held-out, seen and indexing queries"),
            ("--predict_with_generate", training_args.predict_with_generate,
             "every evaluation already writes identifiers under the constraint"),
            ("--generation_num_beams", training_args.generation_num_beams,
             "the beams are --retrieval_k, one per image returned"),
            ("--generation_max_length", training_args.generation_max_length,
             "the longest identifier sets the length")):
        if value:
            raise UsageError(f"{flag} has no effect here: {why}.")
    if training_args.remove_unused_columns:
        raise UsageError("--remove_unused_columns must stay False: the collator reads image_key/caption/kind.")
    if training_args.hub_token:
        raise UsageError("--hub_token is refused: a token on the command line ends up in shell history, logs and "
                         "training_args.bin. Set HF_TOKEN in the environment or run `hf auth login`.")
    loads_from = model_args.model_name_or_path
    if (training_args.do_train and loads_from and os.path.isdir(loads_from)
            and os.path.realpath(loads_from) == os.path.realpath(training_args.output_dir)):
        raise UsageError(f"--output_dir {training_args.output_dir} is the checkpoint --model_name_or_path loads from: "
                         "training would overwrite it. Pick another --output_dir.")
    if (training_args.push_to_hub and not training_args.do_train and loads_from
            and os.path.realpath(loads_from) == os.path.realpath(training_args.output_dir)):
        raise UsageError("--push_to_hub from an evaluate-only run would re-save the checkpoint it loads from; pass "
                         "another --output_dir.")


__all__ = ["check_arguments"]
