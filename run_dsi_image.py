#!/usr/bin/env python
"""Train and evaluate a generative text-to-image retriever (ViT + T5 DSI) or its dual-encoder baseline.

    accelerate launch run_dsi_image.py                      # built-in demo: synthetic scenes, tiny model
    accelerate launch run_dsi_image.py --karpathy_json dataset_flickr30k.json --image_dir flickr30k-images \
        --vision_model_name_or_path google/vit-base-patch16-224-in21k --text_model_name_or_path t5-base \
        --num_index_images 10000 --num_eval_images 2000 --bf16 --output_dir dsi-flickr30k
    python run_dsi_image.py config.yaml                     # every flag from one JSON or YAML file

Every flag is documented in `--help`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
import transformers
from transformers import AutoTokenizer, HfArgumentParser, Seq2SeqTrainingArguments, TrainerCallback, set_seed

from vit_t5_dsi import ImageIndex, ViTT5DSIConfig, load_dsi_model, model_class_for_variant
from vit_t5_dsi.caption_tokenizer import train_caption_tokenizer
from vit_t5_dsi.collection import check_images, load_collection, load_karpathy
from vit_t5_dsi.dsi_data import DSICollator, ImageSource, evaluation_sets, training_stream
from vit_t5_dsi.dsi_splits import build_dsi_splits
from vit_t5_dsi.dsi_trainer import DSITrainer
from vit_t5_dsi.image_processing import ImagePreprocessor
from vit_t5_dsi.model_card import metrics_table, render_model_card
from vit_t5_dsi.retriever import save_image_embeddings
from vit_t5_dsi.synthetic_scenes import generate_scenes

logger = logging.getLogger("run_dsi_image")


@dataclass
class ModelArguments:
    variant: str = field(default="cross_attention", metadata={
        "help": "cross_attention (image-grounded T5 decoder), codebook (visual tokens read by T5's encoder) or "
                "dual_encoder (contrastive dense baseline)."})
    docid_scheme: str = field(default="semantic", metadata={
        "help": "Image identifiers: naive (integer strings), atomic (one new token per image) or semantic "
                "(hierarchical k-means over image embeddings). Ignored by the dual encoder."})
    model_size: str = field(default="tiny", metadata={
        "help": "From-scratch size when no pretrained parts are given: tiny, small or base (ViT-B/16 + T5-base)."})
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "A vit-t5-dsi checkpoint (directory or Hub id) to continue from; its image index is reused when "
                "it covers the same images."})
    vision_model_name_or_path: str | None = field(default=None, metadata={
        "help": "Pretrained image tower: a ViT checkpoint (e.g. google/vit-base-patch16-224-in21k) or a timm "
                "model name. Needs --text_model_name_or_path too."})
    text_model_name_or_path: str | None = field(default=None, metadata={
        "help": "Pretrained T5 (e.g. t5-base); its tokenizer is used. Needs --vision_model_name_or_path too."})
    tokenizer_vocab_size: int = field(default=1024, metadata={
        "help": "Vocabulary of the caption tokenizer trained offline when no pretrained T5 is given."})
    codebook_num_tokens: int = field(default=16, metadata={"help": "codebook: visual tokens per image."})
    codebook_straight_through: bool = field(default=True, metadata={
        "help": "codebook: learn the projection (straight-through estimator). False: the seed's frozen lookup."})
    codebook_commitment_weight: float = field(default=0.01, metadata={
        "help": "codebook: commitment loss weight. Larger values (VQ-VAE's 0.25) collapse every patch onto one "
                "token, since T5's embedding matrix is a fixed codebook."})
    alignment_loss_weight: float = field(default=0.0, metadata={
        "help": "Generative variants: weight of a contrastive image-caption alignment loss (0 = off)."})
    semantic_num_clusters: int = field(default=10, metadata={"help": "semantic ids: k-means branches per level."})
    semantic_max_leaf_size: int | None = field(default=None, metadata={
        "help": "semantic ids: images per leaf at most. Default 100 (DSI's c); the built-in demo uses 10, since "
                "with 300 images c=100 leaves the last id token an arbitrary position among ~100 images."})
    semantic_embeddings: str | None = field(default=None, metadata={
        "help": "semantic ids from this .npy (one row per indexed image, in index order) or from this trained "
                "dual_encoder checkpoint directory. Default: the model's own image tower."})


@dataclass
class DataArguments:
    karpathy_json: str | None = field(default=None, metadata={
        "help": "Karpathy split file (dataset_flickr30k.json, dataset_coco.json); needs --image_dir."})
    image_dir: str | None = field(default=None, metadata={"help": "Directory the image file names are relative to."})
    dataset_name: str | None = field(default=None, metadata={
        "help": "Flickr30K in the Hub parquet layout (image, caption list, split, filename): a local directory "
                "of .parquet files or a dataset name already in the local cache."})
    train_file: str | None = field(default=None, metadata={
        "help": "Prototype JSONL: {image_id, image} rows to index and {image_id, caption} rows to train on."})
    validation_file: str | None = field(default=None, metadata={
        "help": "Prototype JSONL of {image_id, caption} evaluation queries (their images are held out)."})
    num_index_images: int | None = field(default=None, metadata={
        "help": "Images to index (held-out ones included). Flickr30K protocol: 10000."})
    num_eval_images: int | None = field(default=None, metadata={
        "help": "Held-out images whose captions are the evaluation queries. Flickr30K protocol: 2000."})
    heldout_splits: str = field(default="test,val", metadata={
        "help": "Comma-separated split names whose images are held out (Karpathy test and val by default)."})
    seen_captions_per_image: int = field(default=1, metadata={
        "help": "Captions per training image held out as 'seen' evaluation queries (0 = no seen protocol)."})
    indexing_ratio: float | None = field(default=None, metadata={
        "help": "Share of indexing (image -> id) examples in the co-training stream, in (0, 1]; default: every "
                "image and every training caption once per epoch."})
    max_index_eval_images: int | None = field(default=1000, metadata={
        "help": "Indexing accuracy (index_hits@k) is measured on at most this many indexed images."})
    max_caption_length: int = field(default=64, metadata={"help": "Captions are truncated to this many tokens."})
    skip_bad_images: bool = field(default=False, metadata={
        "help": "Leave out missing/unreadable images (logged with their keys) instead of stopping."})
    augment: bool = field(default=False, metadata={"help": "Random resized crops of training images."})
    demo_num_images: int = field(default=300, metadata={"help": "Built-in demo: synthetic images to draw."})
    demo_max_objects: int = field(default=1, metadata={"help": "Built-in demo: objects per image (1-3)."})
    demo_dir: str = field(default="demo_data", metadata={"help": "Built-in demo: where the scenes are written."})

    @property
    def is_demo(self) -> bool:
        return not (self.karpathy_json or self.dataset_name or self.train_file)


@dataclass
class DSITrainingArguments(Seq2SeqTrainingArguments):
    """Seq2SeqTrainingArguments with defaults that make the no-argument run the built-in demo."""

    output_dir: str = field(default="dsi_demo_output", metadata={"help": "Where checkpoints and results go."})
    do_train: bool = field(default=True, metadata={"help": "Train (pass --do_train False to only evaluate)."})
    do_eval: bool = field(default=True, metadata={"help": "Evaluate Hits@k and MRR@10 after training."})
    retrieval_k: int = field(default=10, metadata={"help": "Beams = returned images per query in evaluation."})
    learning_rate: float = field(default=2e-3, metadata={"help": "Peak learning rate (AdamW)."})
    num_train_epochs: float = field(default=300.0, metadata={
        "help": "Training epochs. Memorising ids takes long schedules (DSI trains for hundreds of epochs)."})
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Training batch size per device."})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Evaluation batch size per device."})
    warmup_steps: float = field(default=50, metadata={"help": "Linear warm-up steps."})
    logging_steps: float = field(default=25, metadata={"help": "Log losses every this many steps."})
    save_strategy: str = field(default="steps", metadata={"help": "When to save checkpoints (no/steps/epoch)."})
    save_steps: float = field(default=500, metadata={"help": "Save a resumable checkpoint every this many steps."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep at most this many checkpoints."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Must stay False: the collator reads them."})
    allow_fp16_t5: bool = field(default=False, metadata={
        "help": "Allow --fp16 with T5, which overflows to NaN losses in fp16; prefer --bf16 (or fp32)."})


class SaveRetrievalFilesCallback(TrainerCallback):
    """Each checkpoint carries what retrieval needs besides the weights: the image processor and, for the dual
    encoder, the indexed images' embeddings, so any checkpoint loads into `DSIRetriever` on its own."""

    def __init__(self, preprocessor: ImagePreprocessor, embed_index=None):
        self.preprocessor, self.embed_index = preprocessor, embed_index

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            self.preprocessor.save_pretrained(checkpoint)
            if self.embed_index is not None:
                save_image_embeddings(checkpoint, self.embed_index())


def parse_args(argv=None):
    parser = HfArgumentParser((ModelArguments, DataArguments, DSITrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(os.path.abspath(argv[0]))
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(args=argv)


def check_arguments(model_args: ModelArguments, data_args: DataArguments, training_args: DSITrainingArguments):
    if (model_args.vision_model_name_or_path is None) != (model_args.text_model_name_or_path is None):
        raise ValueError("--vision_model_name_or_path and --text_model_name_or_path go together.")
    if data_args.validation_file and not data_args.train_file:
        raise ValueError("--validation_file needs --train_file (the JSONL layout).")
    if training_args.fp16 and model_args.variant != "dual_encoder" and not training_args.allow_fp16_t5:
        raise ValueError("--fp16 with T5 overflows (NaN losses): use --bf16, or fp32 on GPUs without bf16. "
                         "Pass --allow_fp16_t5 to try anyway.")
    if training_args.remove_unused_columns:
        raise ValueError("--remove_unused_columns must stay False: the collator reads image_key/caption/kind.")


def collection_for(data_args: DataArguments, training_args, seed: int):
    if not data_args.is_demo:
        return load_collection(data_args.karpathy_json, data_args.image_dir, data_args.dataset_name,
                               data_args.train_file, data_args.validation_file)
    demo_dir = os.path.join(data_args.demo_dir,
                            f"scenes_{data_args.demo_num_images}_{data_args.demo_max_objects}obj_seed{seed}")
    json_path = os.path.join(demo_dir, "dataset_synthetic.json")
    with training_args.main_process_first(desc="drawing the synthetic demo collection"):
        if not os.path.exists(json_path):
            logger.info("Built-in demo: drawing %d synthetic scenes into %s", data_args.demo_num_images, demo_dir)
            generate_scenes(demo_dir, data_args.demo_num_images, image_size=64, seed=seed,
                            max_objects=data_args.demo_max_objects, heldout_fraction=0.1)
    return load_karpathy(json_path, os.path.join(demo_dir, "images"))


def load_tokenizer(model_args: ModelArguments, captions: list[str], resume_dir: str | None):
    for source in (resume_dir, model_args.model_name_or_path, model_args.text_model_name_or_path):
        if source is not None:
            return AutoTokenizer.from_pretrained(source)
    logger.info("Training a %d-token caption tokenizer on %d captions (no pretrained T5 given).",
                model_args.tokenizer_vocab_size, len(captions))
    return train_caption_tokenizer(captions, vocab_size=model_args.tokenizer_vocab_size)


def build_model(model_args: ModelArguments, tokenizer):
    codebook = dict(codebook_num_tokens=model_args.codebook_num_tokens,
                    codebook_straight_through=model_args.codebook_straight_through,
                    codebook_commitment_weight=model_args.codebook_commitment_weight,
                    alignment_loss_weight=model_args.alignment_loss_weight)
    if model_args.model_name_or_path:
        return load_dsi_model(model_args.model_name_or_path)
    cls = model_class_for_variant(model_args.variant)
    if model_args.vision_model_name_or_path:
        return cls.from_vision_text_pretrained(model_args.vision_model_name_or_path,
                                               model_args.text_model_name_or_path, variant=model_args.variant,
                                               **codebook)
    config = ViTT5DSIConfig.from_preset(model_args.model_size, variant=model_args.variant,
                                        vocab_size=len(tokenizer), **codebook)
    return cls(config)


@torch.no_grad()
def image_embeddings_for_semantic_ids(model_args, model, keys, images: ImageSource, preprocessor, batch_size=64):
    """Embeddings that semantic ids cluster: a .npy, a trained dual encoder, or the model's own image tower."""
    source = model_args.semantic_embeddings
    if source is not None and source.endswith(".npy"):
        embeddings = np.load(source)
        if len(embeddings) != len(keys):
            raise ValueError(f"--semantic_embeddings {source}: {len(embeddings)} rows for {len(keys)} indexed images.")
        return embeddings
    encoder = load_dsi_model(source) if source is not None else model
    if source is not None and encoder.config.variant != "dual_encoder":
        raise ValueError(f"--semantic_embeddings {source}: expected a .npy file or a dual_encoder checkpoint.")
    encoder.eval()
    rows = []
    for pixels in images.batches(keys, preprocessor, batch_size, desc="Embedding images for semantic ids"):
        pixels = pixels.to(encoder.device)
        if encoder.config.variant == "dual_encoder":
            rows.append(encoder.encode_images(pixels).cpu())
        else:
            rows.append(encoder.vision_states(pixels).mean(1).cpu())
    encoder.train()
    return torch.cat(rows).float().numpy()


def build_index(model_args, model, tokenizer, splits, images, preprocessor, resume_dir, seed,
                is_demo: bool = False) -> ImageIndex:
    keys = splits.index["image_key"][:]
    for source in (resume_dir, model_args.model_name_or_path):
        if source is None:
            continue
        index = ImageIndex.from_pretrained_if_present(source)
        if index is not None and sorted(index.keys) == sorted(keys):
            logger.info("Reusing the image index of %s (%s ids).", source, index.scheme)
            index.check_tokenizer(tokenizer)
            return index
        if source == resume_dir:
            raise ValueError(f"Resuming from {resume_dir}, whose image index does not cover this collection.")
    scheme = "naive" if model_args.variant == "dual_encoder" else model_args.docid_scheme
    embeddings = None
    if scheme == "semantic":
        embeddings = image_embeddings_for_semantic_ids(model_args, model, keys, images, preprocessor)
    max_leaf_size = model_args.semantic_max_leaf_size or (10 if is_demo else 100)
    index = ImageIndex.build(keys, tokenizer, scheme, embeddings, model_args.semantic_num_clusters, max_leaf_size,
                             seed)
    logger.info("Built %s ids for %d images (at most %d tokens).", scheme, len(index), index.max_id_length)
    return index


def share_from_main_process(index: ImageIndex | None, tokenizer, training_args) -> ImageIndex:
    """Every process must train on the same ids: the main process builds them, the others receive them (k-means
    or float differences could otherwise give each process its own labels)."""
    if training_args.world_size > 1:
        from accelerate.utils import broadcast_object_list

        payload = [index.to_dict() if index is not None else None]
        broadcast_object_list(payload, from_process=0)
        index = ImageIndex.from_dict(payload[0])
        missing = [t for t in index.added_tokens if t not in tokenizer.get_vocab()]
        if missing:  # atomic ids: the main process added these tokens to its tokenizer
            tokenizer.add_tokens(missing)
        index.check_tokenizer(tokenizer)
    return index


def main(argv=None):
    model_args, data_args, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if training_args.should_log else logging.WARNING, handlers=[
                            logging.StreamHandler(sys.stdout)])
    transformers.utils.logging.set_verbosity_warning()
    check_arguments(model_args, data_args, training_args)
    if training_args.device.type == "cpu":
        training_args.dataloader_pin_memory = False  # pinning only helps copies to an accelerator
    set_seed(training_args.seed)
    logger.info("world size %d, device %s, variant %s", training_args.world_size, training_args.device,
                model_args.variant)

    collection = collection_for(data_args, training_args, training_args.seed)
    collection = check_images(collection, data_args.skip_bad_images,
                              progress=training_args.should_log and not training_args.disable_tqdm)
    splits = build_dsi_splits(collection, data_args.num_index_images, data_args.num_eval_images,
                              data_args.seen_captions_per_image, tuple(data_args.heldout_splits.split(",")),
                              training_args.seed)
    logger.info("Protocol: %s", splits.summary())

    resume_dir = training_args.resume_from_checkpoint
    if resume_dir is not None and not os.path.isdir(resume_dir):
        raise ValueError(f"--resume_from_checkpoint {resume_dir}: no such checkpoint directory.")
    tokenizer = load_tokenizer(model_args, splits.train_queries["caption"][:], resume_dir)
    model = build_model(model_args, tokenizer)
    if model_args.model_name_or_path is None and resume_dir is None:
        logger.info("Model: %s, %.1fM parameters", type(model).__name__, model.num_parameters() / 1e6)
    preprocessor = ImagePreprocessor.for_model_config(model.config, model_args.vision_model_name_or_path or
                                                      model_args.model_name_or_path)
    images = ImageSource(splits.index)
    index = None
    if training_args.process_index == 0:
        index = build_index(model_args, model, tokenizer, splits, images, preprocessor, resume_dir, training_args.seed,
                            data_args.is_demo)
    index = share_from_main_process(index, tokenizer, training_args)
    index.resize_model_embeddings(model)
    model.image_index = index

    collator = DSICollator(index, images, preprocessor, tokenizer, model.config.variant,
                           data_args.max_caption_length,
                           ImagePreprocessor(preprocessor.processor, augment=True) if data_args.augment else None)
    train_dataset = training_stream(splits, model.config.variant, data_args.indexing_ratio, training_args.seed)
    eval_sets = evaluation_sets(splits, data_args.max_index_eval_images)

    def model_card() -> str:
        description = (f"built-in synthetic scenes ({len(collection)} images)" if data_args.is_demo else
                       f"{collection.source}: {splits.summary()}")
        training = (f"{training_args.num_train_epochs:g} epochs, batch {training_args.per_device_train_batch_size}"
                    f" x {training_args.world_size} processes, lr {training_args.learning_rate:g}")
        return render_model_card(trainer.model, final_metrics, os.path.basename(training_args.output_dir.rstrip("/")),
                                 training_args.hub_model_id or training_args.output_dir, description, training,
                                 data_args.dataset_name)

    final_metrics: dict[str, float] = {}
    trainer = DSITrainer(model=model, args=training_args, train_dataset=train_dataset if training_args.do_train
                         else None, data_collator=collator, processing_class=tokenizer, eval_sets=eval_sets,
                         retrieval_k=training_args.retrieval_k, model_card_fn=model_card)
    trainer.add_callback(SaveRetrievalFilesCallback(preprocessor, trainer.embed_index if trainer.is_dual_encoder
                                                    else None))

    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=resume_dir)
        trainer.save_model()
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
        final_metrics.update(result.metrics)
    else:
        trainer.save_model()  # an evaluate-only run still leaves a complete checkpoint for its card and the Hub
    if trainer.is_world_process_zero():
        preprocessor.save_pretrained(training_args.output_dir)

    if training_args.do_eval:
        metrics = trainer.evaluate()
        metrics["world_size"] = training_args.world_size
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        final_metrics.update(metrics)
        if trainer.is_world_process_zero():
            print("\n" + metrics_table(metrics) + "\n", flush=True)

    if model.config.variant == "dual_encoder" and trainer.is_world_process_zero():
        save_image_embeddings(training_args.output_dir, trainer.embed_index())
    if trainer.is_world_process_zero():
        trainer.create_model_card()
        with open(os.path.join(training_args.output_dir, "protocol.json"), "w") as f:
            json.dump({"source": collection.source, "num_indexed": len(splits.index),
                       "num_train_queries": len(splits.train_queries), "num_eval_queries": len(splits.eval_queries),
                       "num_seen_queries": len(splits.seen_queries), "variant": model.config.variant,
                       "docid_scheme": index.scheme}, f, indent=2)
    if training_args.push_to_hub:
        trainer.push_to_hub()
    return final_metrics


if __name__ == "__main__":
    main()
