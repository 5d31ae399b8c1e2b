"""The steps of a training run, in the order `run_dsi_image.main` calls them; the dense stage runs the same
steps for its dual encoder. Each step takes what it needs and returns what the next one reads."""

from __future__ import annotations

import logging
import os
import sys

import transformers
from accelerate import PartialState
from transformers import AutoTokenizer, set_seed

from ..checkpoint.configuration_vit_t5_dsi import ViTT5DSIConfig
from ..checkpoint.checkpoint_io import UsageError
from ..checkpoint.loading import load_dsi_model, model_class_for_variant
from ..checkpoint.processing_vit_t5_dsi import ViTT5DSIProcessor
from ..data.caption_tokenizer import caption_tokenizer_from_str, train_caption_tokenizer
from ..data.collection import check_images
from ..data.collection_from_flags import collection_for
from ..data.splits import build_dsi_splits
from .distributed import broadcast_from_main
from .model_card import metrics_table
from .output_dir import check_output_dir, clear_previous_run
from .trainer import checkpoint_is_complete

logger = logging.getLogger("run_dsi_image")


def configure_logging(training_args) -> None:
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if training_args.should_log else logging.WARNING,
                        handlers=[logging.StreamHandler(sys.stdout)])
    transformers.utils.logging.set_verbosity_warning()


def checkpoint_to_resume(training_args) -> str | None:
    """--resume_from_checkpoint, checked: a complete checkpoint folder, or None."""
    resume_dir = training_args.resume_from_checkpoint
    if resume_dir is not None and not os.path.isdir(resume_dir):
        raise UsageError(f"--resume_from_checkpoint {resume_dir}: no such checkpoint directory.")
    if resume_dir is not None and not checkpoint_is_complete(resume_dir):
        raise UsageError(f"--resume_from_checkpoint {resume_dir}: the checkpoint is incomplete (the run stopped while "
                         "writing it, or an older version wrote it). Resume from the one before it.")
    return resume_dir


def prepare_output_dir(model_args, training_args, resume_dir: str | None) -> None:
    """Refuse a used --output_dir (or clear it with --overwrite_output_dir) before anything is written."""
    check_output_dir(training_args.output_dir, training_args.overwrite_output_dir, resume_dir is not None,
                     model_args.dense_first)
    with training_args.main_process_first(desc="clearing the previous run"):
        if training_args.overwrite_output_dir and training_args.process_index == 0 and resume_dir is None:
            clear_previous_run(training_args.output_dir, keep_model=not training_args.do_train)
    if training_args.device.type == "cpu":
        training_args.dataloader_pin_memory = False  # pinning only helps copies to an accelerator


def load_collection_and_splits(data_args, training_args):
    """The collection (images checked) and the protocol's splits: indexed images, training, held-out and seen
    captions."""
    collection = check_images(collection_for(data_args, training_args.seed, training_args.main_process_first),
                              data_args.skip_bad_images,
                              progress=training_args.should_log and not training_args.disable_tqdm)
    splits = build_dsi_splits(collection, data_args.num_index_images, data_args.num_eval_images,
                              data_args.seen_captions_per_image, tuple(data_args.heldout_splits.split(",")),
                              training_args.seed).sampled(data_args.max_train_samples, data_args.max_eval_samples,
                                                          training_args.seed)
    logger.info("Protocol: %s", splits.summary())
    if training_args.do_train and len(splits.train_queries) == 0:
        raise UsageError(f"Every image of {collection.source} is held out (--heldout_splits "
                         f"{data_args.heldout_splits}, --num_eval_images {data_args.num_eval_images}): no caption is "
                         "left to train retrieval on. Hold out fewer images.")
    if len(splits.index) < training_args.retrieval_k:
        raise UsageError(f"--retrieval_k {training_args.retrieval_k} is larger than the {len(splits.index)} indexed "
                         "images.")
    return collection, splits


def new_tokenizer(model_args, captions: list[str]):
    """A pretrained T5's tokenizer, or one trained on the training captions: on the main process only, then sent
    to the others, and checked identical on every process."""
    if model_args.text_model_name_or_path is not None or model_args.tokenizer_name_or_path is not None:
        return AutoTokenizer.from_pretrained(model_args.tokenizer_name_or_path or model_args.text_model_name_or_path)
    serialized = None
    if PartialState().is_main_process:
        logger.info("Training a %d-token caption tokenizer on %d captions (no pretrained T5 given).",
                    model_args.tokenizer_vocab_size, len(captions))
        serialized = train_caption_tokenizer(captions, model_args.tokenizer_vocab_size).backend_tokenizer.to_str()
    return caption_tokenizer_from_str(broadcast_from_main(serialized))


def build_model(model_args, vocab_size: int):
    if model_args.model_name_or_path:
        return load_dsi_model(model_args.model_name_or_path)
    options = dict(codebook_num_tokens=model_args.codebook_num_tokens,
                   codebook_straight_through=model_args.codebook_straight_through,
                   codebook_commitment_weight=model_args.codebook_commitment_weight,
                   alignment_loss_weight=model_args.alignment_loss_weight)
    cls = model_class_for_variant(model_args.variant)
    try:
        if model_args.vision_model_name_or_path:
            return cls.from_vision_text_pretrained(model_args.vision_model_name_or_path,
                                                   model_args.text_model_name_or_path, variant=model_args.variant,
                                                   **options)
        config = ViTT5DSIConfig.from_preset(model_args.model_size, variant=model_args.variant, vocab_size=vocab_size,
                                            **options)
    except ValueError as err:  # the config names the field; its flag has the same name
        raise UsageError(f"{err} (set by the flag of the same name)") from err
    return cls(config)


def build_model_and_processor(model_args, data_args, training_args, splits, processor_from: str | None):
    """The model and its processor. The processor (so the tokenizer) comes from `processor_from` (the checkpoint
    resumed or continued, or the dual encoder a generative model follows) or is new; the model is built for that
    vocabulary. Seeded here, per model: a generative model starts the same whether the dense stage before it was
    trained in this process or reused from an earlier run."""
    set_seed(training_args.seed)
    if processor_from:
        processor = ViTT5DSIProcessor.from_pretrained(processor_from)
        model = build_model(model_args, len(processor.tokenizer))
    else:
        tokenizer = new_tokenizer(model_args, splits.train_queries["caption"][:])
        model = build_model(model_args, len(tokenizer))
        processor = ViTT5DSIProcessor.for_model(model.config, tokenizer, model_args.vision_model_name_or_path)
    processor.max_caption_length = data_args.max_caption_length
    if model_args.model_name_or_path is None and training_args.resume_from_checkpoint is None:
        logger.info("Model: %s, %.1fM parameters", type(model).__name__, model.num_parameters() / 1e6)
    return model, processor


def train_and_evaluate(trainer, training_args, extra_metrics: dict[str, float] | None = None) -> dict[str, float]:
    """Train (resuming when asked), save the model, evaluate every query set; `extra_metrics` (the dense
    stage's) are saved and reported beside this model's. Returns every figure of the run."""
    final: dict[str, float] = {}
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
        final.update(result.metrics)
    if extra_metrics:  # beside the generative figures: all_results.json, the card and the table
        trainer.save_metrics("dense", extra_metrics)
        final.update(extra_metrics)
    if training_args.do_eval:
        metrics = trainer.evaluate()
        metrics["world_size"] = training_args.world_size
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        final.update(metrics)
        if trainer.is_world_process_zero():
            print("\n" + metrics_table({**(extra_metrics or {}), **metrics}) + "\n", flush=True)
    return final


def collection_description(data_args, collection, splits) -> str:
    """How the model card and the Hub name the collection."""
    return (f"built-in synthetic scenes ({len(collection)} images)" if data_args.is_demo else
            f"{collection.source}: {splits.summary()}")


__all__ = ["configure_logging", "checkpoint_to_resume", "prepare_output_dir", "load_collection_and_splits",
           "new_tokenizer", "build_model", "build_model_and_processor", "train_and_evaluate",
           "collection_description"]
