"""The flags of `run_dsi_image.py`, as `HfArgumentParser` dataclasses (their combinations are checked in
`argument_checks.py`).

Choices are typed (`Literal`), so a typo fails when the flags are parsed. The defaults that depend on other flags
(the recipe) are filled in one place, `recipe.resolve_recipe`; errors here name flags, since users meet them on the command line.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Literal

from transformers import HfArgumentParser, Seq2SeqTrainingArguments

from .recipe import (DEMO_SEMANTIC_MAX_LEAF_SIZE, DEMO_TRAIN_EPOCHS, RECIPE_PSEUDO_QUERIES, SEMANTIC_MAX_LEAF_SIZE,
                     TRAIN_EPOCHS)


@dataclass
class ModelArguments:
    variant: Literal["cross_attention", "codebook", "dual_encoder"] = field(default="cross_attention", metadata={
        "help": "cross_attention (image-grounded T5 decoder), codebook (visual tokens read by T5's encoder) or "
                "dual_encoder (contrastive dense baseline)."})
    docid_scheme: Literal["naive", "atomic", "semantic", "rq"] | None = field(default=None, metadata={
        "help": "Image identifiers: naive (integer strings), atomic (one new token per image), semantic "
                "(hierarchical k-means over image embeddings) or rq (residual quantization of image embeddings, one "
                "token per level and code). Default rq, cut from the dual encoder --dense_first trains. "
                "Ignored by the dual encoder."})
    model_size: Literal["tiny", "small", "base"] = field(default="tiny", metadata={
        "help": "From-scratch size when no pretrained parts are given: tiny, small or base (ViT-B/16 + T5-base)."})
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "A vit-t5-dsi checkpoint (directory or Hub id) to continue from or evaluate. Its image index must "
                "cover the collection exactly, unless --reindex."})
    reindex: bool = field(default=False, metadata={
        "help": "With --model_name_or_path: build new identifiers when the checkpoint's index does not cover this "
                "collection (the loaded weights then no longer know which image each id names)."})
    vision_model_name_or_path: str | None = field(default=None, metadata={
        "help": "Pretrained image tower: a ViT checkpoint (e.g. google/vit-base-patch16-224-in21k) or a timm "
                "model name. Needs --text_model_name_or_path too."})
    text_model_name_or_path: str | None = field(default=None, metadata={
        "help": "Pretrained T5 (e.g. t5-base); its tokenizer is used. Needs --vision_model_name_or_path too."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={
        "help": "A tokenizer (directory or Hub id, e.g. an earlier run's output_dir) instead of training a caption "
                "tokenizer (e.g. to share one vocabulary between runs on different captions)."})
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
        "help": f"semantic ids: images per leaf at most. Default {SEMANTIC_MAX_LEAF_SIZE} (DSI's c); the built-in "
                f"demo uses {DEMO_SEMANTIC_MAX_LEAF_SIZE}."})
    semantic_embeddings: str | None = field(default=None, metadata={
        "help": "semantic and rq ids from this .npy (one row per indexed image, in index order) or from this trained "
                "dual_encoder checkpoint directory. Default: the model's own image tower (or the dual encoder "
                "--dense_first trains)."})
    rq_num_levels: int = field(default=3, metadata={
        "help": "rq ids: quantization levels (tokens per id; images that share every code get one more level)."})
    rq_codes_per_level: int | None = field(default=None, metadata={
        "help": "rq ids: k-means codes per level. Default: the smallest number giving at least 4 cells per image "
                "over the levels (11 for the demo's 300 images at 3 levels), at least 2."})
    rq_code_embeddings: bool = field(default=True, metadata={
        "help": "rq ids: start each code token's embedding at its code's vector (GENIUS), so the decoder begins "
                "with token similarities that are those of the image embeddings. False: random initialisation."})
    start_from_dense: bool | None = field(default=None, metadata={
        "help": "With --dense_first: the generative model starts from the trained dual encoder's image tower, T5 "
                "encoder and token embeddings (default: on with --dense_first), so its decoder only has to learn to "
                "write the codes of the embedding space the ids were cut from."})
    dense_first: bool | None = field(default=None, metadata={
        "help": "Dense-then-generative recipe: first train the dual encoder on the same data (saved as a complete "
                "checkpoint in OUTPUT_DIR/dual_encoder, its metrics reported as dense_*), build the generative "
                "model's semantic or rq ids from its image embeddings, then train the generative model. A finished "
                "dense stage is reused when the run is resumed; an interrupted one resumes from its checkpoints."})
    dense_first_epochs: float | None = field(default=None, metadata={
        "help": "--dense_first: epochs of the dual encoder (default: 2/3 of the generative model's budget, in "
                "epochs or --max_steps; the built-in demo: 100 of 150 epochs)."})
    rerank_with: str | None = field(default=None, metadata={
        "help": "Re-rank each text query's generative top-k with a dual encoder's similarity: a dual_encoder "
                "checkpoint (directory or Hub id), 'dense_first' for the one --dense_first trains, or 'none'. Reported "
                "under rerank_* keys (eval_rerank_hits@1, ...) beside the pure generative figures. A query file's "
                "evaluation (--validation_file alone) re-ranks with the checkpoint's own dual_encoder/ by default."})
    rerank_weight: float = field(default=0.5, metadata={
        "help": "--rerank_with: weight of the dense score against the generative one, in [0, 1] (both as "
                "log-probabilities over the k candidates; 1 = order the beam's candidates by the dual encoder "
                "alone)."})


@dataclass
class DataArguments:
    karpathy_json: str | None = field(default=None, metadata={
        "help": "Karpathy split file (dataset_flickr30k.json, dataset_coco.json); needs --image_dir."})
    image_dir: str | None = field(default=None, metadata={
        "help": "Directory the image file names are relative to (paths may not leave it)."})
    dataset_name: str | None = field(default=None, metadata={
        "help": "Flickr30K in the Hub parquet layout (image, caption list, split, filename): a local directory "
                "of .parquet files or a dataset name already in the local cache."})
    train_file: str | None = field(default=None, metadata={
        "help": "Prototype JSONL: {image_id, image} rows to index and {image_id, caption} rows to train on."})
    validation_file: str | None = field(default=None, metadata={
        "help": "Prototype JSONL of {image_id, caption} evaluation queries. They never train: images without "
                "training captions are held out, the others' validation captions are 'seen' queries. Without "
                "--train_file (with --model_name_or_path CKPT --do_train False): evaluate these queries against "
                "the checkpoint's own index, no collection needed."})
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
    max_index_eval_images: int = field(default=1000, metadata={
        "help": "Indexing accuracy (index_hits@k) is measured on at most this many indexed images (0 = not "
                "measured)."})
    max_train_samples: int | None = field(default=None, metadata={
        "help": "Train on at most this many training captions (a seeded sample; every image is still indexed): a "
                "quick run on a large collection."})
    max_eval_samples: int | None = field(default=None, metadata={
        "help": "Every evaluation ranks at most this many held-out and seen queries each (a seeded sample). Figures "
                "to publish need all of them."})
    eval_queries_during_training: int = field(default=500, metadata={
        "help": "Evaluations during training (--eval_strategy steps|epoch) rank at most this many queries per set "
                "(the same seeded sample each time); the evaluation after training ranks them all. 0 = all."})
    max_caption_length: int = field(default=64, metadata={"help": "Captions are truncated to this many tokens."})
    captioning_ratio: float | None = field(default=None, metadata={
        "help": "Generative variants: captioning rows (image -> caption, the seed's first step) per training caption "
                "per epoch, in [0, 1]; 0 = no captioning (and so no pseudo-queries written). Captions of training "
                f"images only. Default {RECIPE_PSEUDO_QUERIES['captioning_ratio']} for a generative model trained "
                "from scratch, else 0."})
    pseudo_queries: str | None = field(default=None, metadata={
        "help": "JSONL of {image_id, caption} pseudo-queries (from generate_pseudo_queries.py or any captioner) "
                "trained on as retrieval rows, every one once per epoch; never evaluation queries."})
    pseudo_query_epochs: str | None = field(default=None, metadata={
        "help": "One-command route: comma-separated epochs at which the model being trained (with "
                "--captioning_ratio > 0) writes new pseudo-queries, e.g. '100' or '100,200'."})
    pseudo_query_at: str | None = field(default=None, metadata={
        "help": "Comma-separated fractions of training (e.g. '0.2') at whose epoch boundaries the model being trained "
                "writes new pseudo-queries; the same schedule for any --num_train_epochs or --max_steps. "
                "--pseudo_query_epochs names epochs instead. 'none' = no pseudo-queries."})
    pseudo_query_filter_top_k: int | None = field(default=None, metadata={
        "help": "Keep a written pseudo-query only when the dual encoder (--dense_first or --rerank_with) ranks its own "
                "image within this many of all indexed images (every image keeps its best one); 0 = keep all."})
    pseudo_query_drop_copies: bool | None = field(default=None, metadata={
        "help": "With the round-trip filter: drop a written pseudo-query that is a training caption of another image "
                "(case and spacing ignored); it describes that image, and would lead its caption to this one's id. "
                "Default: on in the recipe (docs/recipe.md has the measurements)."})
    num_pseudo_queries: int | None = field(default=None, metadata={
        "help": "Pseudo-queries sampled per image (before deduplication), for --pseudo_query_epochs / "
                "--pseudo_query_at (default: 30 in the recipe, which filters them; 10 otherwise)."})
    pseudo_query_rows_per_image: int | None = field(default=None, metadata={
        "help": "Pseudo-query rows per image per epoch for --pseudo_query_epochs (default --num_pseudo_queries); a "
                "row takes the image's next distinct pseudo-query, so distinct ones repeat when there are fewer."})
    pseudo_query_images: Literal["all", "uncaptioned"] | None = field(default=None, metadata={
        "help": "Which indexed images get pseudo-queries: all (the default with --pseudo_queries FILE), or only "
                "those without training captions (uncaptioned: the held-out ones; the default when the model writes "
                "them, since pseudo-queries for captioned images cost seen-caption "
                "quality and their writing time grows with the collection)."})
    keep_captioning: bool = field(default=False, metadata={
        "help": "With --pseudo_query_epochs: keep training captioning rows after the last refresh (by default they "
                "stop there, since they make every step slower; the final eval_caption_* metrics then describe a "
                "captioner that has drifted, while protocol.json keeps the writer's own at the refresh)."})
    pseudo_query_top_k: int = field(default=20, metadata={
        "help": "Top-k sampling for pseudo-queries (more diverse with larger k)."})
    skip_bad_images: bool = field(default=False, metadata={
        "help": "Leave out missing/unreadable images (logged with their keys) instead of stopping."})
    augment: bool = field(default=False, metadata={"help": "Random resized crops of training images."})
    image_cache_mb: float = field(default=4096, metadata={
        "help": "Decode and resize each image once and keep it as uint8 pixels in memory shared by the DataLoader "
                "workers, up to this many MB per machine (split between its training processes; Flickr30K at 224 px "
                "needs about 4,700); later epochs only convert and augment, with or without workers. Images beyond "
                "the budget are decoded every time; a changed image file is decoded again. 0 = off."})
    demo_num_images: int = field(default=300, metadata={"help": "Built-in demo: synthetic images to draw."})
    demo_max_objects: int = field(default=1, metadata={"help": "Built-in demo: objects per image (1-3)."})
    demo_dir: str = field(default="demo_data", metadata={"help": "Built-in demo: where the scenes are written."})

    @property
    def is_demo(self) -> bool:
        return not (self.karpathy_json or self.dataset_name or self.train_file or self.validation_file)

    @property
    def evaluates_query_file(self) -> bool:
        """--validation_file alone: its queries against a checkpoint's index (`query_file_evaluation.py`)."""
        return bool(self.validation_file) and not (self.karpathy_json or self.dataset_name or self.train_file)


@dataclass
class DSITrainingArguments(Seq2SeqTrainingArguments):
    """Seq2SeqTrainingArguments with defaults that make the no-argument run the built-in demo."""

    output_dir: str = field(default="dsi_demo_output", metadata={"help": "Where checkpoints and results go."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Replace the run in a non-empty --output_dir (its results, index and checkpoints are removed "
                "first). Without it, a non-empty --output_dir is refused unless --resume_from_checkpoint."})
    do_train: bool = field(default=True, metadata={"help": "Train (pass --do_train False to only evaluate)."})
    do_eval: bool = field(default=True, metadata={"help": "Evaluate Hits@k and MRR@10 after training."})
    save_predictions: bool = field(default=True, metadata={
        "help": "After training, write each query set's per-query results (query, gold image, its rank, the top-k "
                "image keys and scores) to OUTPUT_DIR/<set>_predictions.jsonl, for error analysis."})
    retrieval_k: int = field(default=10, metadata={
        "help": "Beams = returned images per query in evaluation; Hits@k is reported for k in 1, 5, 10 up to it."})
    learning_rate: float = field(default=2e-3, metadata={"help": "Peak learning rate (AdamW)."})
    num_train_epochs: float | None = field(default=None, metadata={
        "help": f"Training epochs (default {TRAIN_EPOCHS:g}; the built-in demo: {DEMO_TRAIN_EPOCHS:g}). Memorising ids "
                "takes long schedules (DSI trains for hundreds of epochs)."})
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


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, DSITrainingArguments]:
    """Flags, or one .json / .yaml file holding them all."""
    parser = HfArgumentParser((ModelArguments, DataArguments, DSITrainingArguments))
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        parsed = parser.parse_json_file(os.path.abspath(argv[0]))
    elif len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        parsed = parser.parse_yaml_file(os.path.abspath(argv[0]))
    else:
        parsed = parser.parse_args_into_dataclasses(args=_bare_switches_set(argv))
    from .distributed import apply_collective_timeout
    from .resume import resolve_latest_checkpoint

    resolve_latest_checkpoint(parsed[2])

    apply_collective_timeout(parsed[2].ddp_timeout)  # transformers applies it to GPU backends only
    return parsed


# Switches whose default depends on other flags (None = "not given"): HfArgumentParser makes an Optional[bool]
# without a default take a value, so a bare `--dense_first` becomes `--dense_first True` here.
OPTIONAL_SWITCHES = ("--dense_first", "--dense-first", "--start_from_dense", "--start-from-dense")


def _bare_switches_set(argv: list[str]) -> list[str]:
    out = []
    for i, arg in enumerate(argv):
        out.append(arg)
        following = argv[i + 1] if i + 1 < len(argv) else None
        if arg in OPTIONAL_SWITCHES and (following is None or following.startswith("--")):
            out.append("True")
    return out


__all__ = ["ModelArguments", "DataArguments", "DSITrainingArguments", "parse_args"]
