#!/usr/bin/env python
"""Train and evaluate a generative text-to-image retriever (ViT + T5 DSI) or its dual-encoder baseline.

    accelerate launch run_dsi_image.py                      # built-in demo: synthetic scenes, tiny model
    accelerate launch run_dsi_image.py --karpathy_json dataset_flickr30k.json --image_dir flickr30k-images \\
        --vision_model_name_or_path google/vit-base-patch16-224-in21k --text_model_name_or_path t5-base \\
        --num_index_images 10000 --num_eval_images 2000 --bf16 --output_dir dsi-flickr30k
    python run_dsi_image.py config.yaml                     # every flag from one JSON or YAML file

Every flag is documented in `--help`. This script holds the wiring; the logic lives in the `vit_t5_dsi` package.
A usage error (bad data, a bad flag combination) prints one line and exits with status 2.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import numpy as np
import transformers
from accelerate import PartialState
from transformers import AutoTokenizer, set_seed

from vit_t5_dsi.identifiers.build import build_image_index, initialise_code_embeddings
from vit_t5_dsi import (ImageIndex, ViTT5DSIConfig, ViTT5DSIProcessor, load_dense_reranker, load_dsi_model,
                        model_class_for_variant)
from vit_t5_dsi.training.arguments import DataArguments, DSITrainingArguments, ModelArguments, check_arguments, parse_args
from vit_t5_dsi.training.recipe import pseudo_query_epochs, pseudo_query_fractions, resolve_recipe, rq_codes_per_level
from vit_t5_dsi.checkpoint.atomic_io import atomic_write_text, disk_full_errno
from vit_t5_dsi.data.caption_tokenizer import caption_tokenizer_from_str, train_caption_tokenizer
from vit_t5_dsi.data.collection import check_images
from vit_t5_dsi.data.collection_from_flags import collection_for
from vit_t5_dsi.training.dense_stage import dense_stage_arguments, finished_dense_model, remove_checkpoints, start_from_dense
from vit_t5_dsi.checkpoint.dense_reranking import DenseReranker
from vit_t5_dsi.training.distributed import broadcast_from_main, check_identical_on_every_process, end_distributed_run
from vit_t5_dsi.data.rows import ImageSource, evaluation_sets, training_stream
from vit_t5_dsi.data.splits import build_dsi_splits
from vit_t5_dsi.training.trainer import DSITrainer, checkpoint_is_complete
from vit_t5_dsi.checkpoint.errors import UsageError
from vit_t5_dsi.checkpoint.image_index import EMBEDDING_SCHEMES
from vit_t5_dsi.training.image_embeddings import embed_images
from vit_t5_dsi.training.model_card import metrics_table
from vit_t5_dsi.training.output_dir import check_output_dir, clear_previous_run
from vit_t5_dsi.training.pseudo_queries import PSEUDO_QUERIES_FILE, PseudoQueries, PseudoQueryRefresh, RoundTripFilter

logger = logging.getLogger("run_dsi_image")


def new_tokenizer(model_args: ModelArguments, captions: list[str]):
    """A pretrained T5's tokenizer, or one trained on the training captions: on the main process only, then sent
    to the others, and checked identical on every process."""
    if model_args.text_model_name_or_path is not None or model_args.tokenizer_name_or_path is not None:
        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name_or_path or
                                                  model_args.text_model_name_or_path)
    else:
        serialized = None
        if PartialState().is_main_process:
            logger.info("Training a %d-token caption tokenizer on %d captions (no pretrained T5 given).",
                        model_args.tokenizer_vocab_size, len(captions))
            serialized = train_caption_tokenizer(captions, model_args.tokenizer_vocab_size).backend_tokenizer.to_str()
        tokenizer = caption_tokenizer_from_str(broadcast_from_main(serialized))
    return tokenizer


def build_model(model_args: ModelArguments, vocab_size: int):
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


def model_and_processor(model_args: ModelArguments, data_args: DataArguments, captions: list[str],
                        resume_dir: str | None, dense_dir: str | None = None):
    """A checkpoint's own processor (and so its tokenizer), or a new one; the model built for that vocabulary.
    After --dense_first the new model shares the dual encoder's tokenizer."""
    source = resume_dir or model_args.model_name_or_path or dense_dir
    if source:
        processor = ViTT5DSIProcessor.from_pretrained(source)
        model = build_model(model_args, len(processor.tokenizer))
    else:
        tokenizer = new_tokenizer(model_args, captions)
        model = build_model(model_args, len(tokenizer))
        processor = ViTT5DSIProcessor.for_model(model.config, tokenizer, model_args.vision_model_name_or_path)
    processor.max_caption_length = data_args.max_caption_length
    return model, processor


def id_embeddings(model_args: ModelArguments, model, keys, images: ImageSource, processor,
                  training_args: DSITrainingArguments, dense_dir: str | None = None) -> np.ndarray:
    """What semantic and rq ids are built from: a .npy, a trained dual encoder (--semantic_embeddings, or the one
    --dense_first trained in `dense_dir`), or the model's own image tower. A dual encoder's saved index embeddings
    are used as they are when they cover the collection; otherwise images are embedded on the accelerator, each
    process its share (call on every process)."""
    source = dense_dir or model_args.semantic_embeddings
    flag = "--dense_first" if dense_dir else f"--semantic_embeddings {source}"
    if source is not None and source.endswith(".npy"):
        embeddings = np.load(source)
        if embeddings.ndim != 2 or len(embeddings) != len(keys):
            raise UsageError(f"{flag}: shape {embeddings.shape} for {len(keys)} indexed images (expected one row "
                             "per image, in index order).")
        return embeddings
    encoder, encoder_processor = model, processor
    if source is not None:
        encoder = load_dsi_model(source)
        if encoder.config.variant != "dual_encoder":
            raise UsageError(f"{flag}: expected a .npy file or a dual_encoder checkpoint.")
        try:
            embeddings = encoder.image_index.embeddings_for(keys).float().numpy()
            logger.info("Id embeddings: the image embeddings saved with %s.", source)
            return embeddings
        except (AttributeError, ValueError):  # no saved index or embeddings, or not for all of these images
            pass
        encoder_processor = ViTT5DSIProcessor.from_pretrained(source)  # its own image size and normalisation
    encoder.to(training_args.device)
    return embed_images(encoder, keys, images, encoder_processor, training_args.per_device_eval_batch_size,
                        training_args.device, desc="Embedding images for the ids"
                        if training_args.should_log and not training_args.disable_tqdm else None).numpy()


def _coverage_problem(index: ImageIndex, keys: list[str]) -> str | None:
    indexed, wanted = set(index.keys), set(keys)
    if indexed == wanted:
        return None
    missing, extra = sorted(wanted - indexed), sorted(indexed - wanted)
    return (f"its image index holds {len(indexed)} images, this collection {len(wanted)} ({len(missing)} not in the "
            f"index, e.g. {missing[:3]}; {len(extra)} in the index only, e.g. {extra[:3]})")


def image_index_for(model_args, model, processor, splits, images, resume_dir, training_args,
                    dense_dir: str | None = None) -> ImageIndex:
    """The checkpoint's index when it covers the collection exactly; new ids only on request (--reindex) or for a
    new model. New ids are built on the main process and sent to the others."""
    keys = splits.index["image_key"][:]
    if resume_dir is not None:
        index = ImageIndex.from_pretrained(resume_dir)
        problem = "it has no image index" if index is None else _coverage_problem(index, keys)
        if problem:
            raise UsageError(f"--resume_from_checkpoint {resume_dir}: {problem}. Resume with the data it was "
                             "trained on.")
        return index
    if model_args.model_name_or_path and not model_args.reindex:
        index = model.image_index
        problem = "it has no image index" if index is None else _coverage_problem(index, keys)
        if problem:
            raise UsageError(f"--model_name_or_path {model_args.model_name_or_path}: {problem}. Pass --reindex to "
                             "build new identifiers for this collection (the model then has to learn them).")
        logger.info("Reusing the image index of %s (%s ids).", model_args.model_name_or_path, index.scheme)
        return index
    scheme = "naive" if model_args.variant == "dual_encoder" else model_args.docid_scheme
    embeddings = None
    if scheme in EMBEDDING_SCHEMES:
        embeddings = id_embeddings(model_args, model, keys, images, processor, training_args, dense_dir)
    payload = None
    if training_args.process_index == 0:
        index = build_image_index(keys, processor.tokenizer, scheme, embeddings=embeddings,
                                  num_clusters=model_args.semantic_num_clusters,
                                  max_leaf_size=model_args.semantic_max_leaf_size, seed=training_args.seed,
                                  rq_num_levels=model_args.rq_num_levels,
                                  rq_codes_per_level=rq_codes_per_level(model_args, len(keys)))
        logger.info("Built %s ids for %d images (at most %d tokens)%s.", scheme, len(index), index.max_id_length,
                    f": {index.scheme_info}" if index.scheme_info else "")
        payload = {"index": index.to_dict(),
                   "code_vectors": {token: vector.tolist() for token, vector in index.code_vectors.items()}}
    payload = broadcast_from_main(payload)
    index = ImageIndex.from_dict(payload["index"])
    index.code_vectors = {int(token): np.asarray(vector) for token, vector in payload["code_vectors"].items()}
    missing = [t for t in index.added_tokens if t not in processor.tokenizer.get_vocab()]
    if missing:  # atomic and rq ids: the main process added these tokens to its tokenizer
        processor.tokenizer.add_tokens(missing)
    return index


def dense_reranker(model_args, data_args, index: ImageIndex, dense_dir: str | None,
                   dense_model=None) -> DenseReranker | None:
    """The dual encoder that re-ranks the beam (--rerank_with) and filters pseudo-queries
    (--pseudo_query_filter_top_k): the one --rerank_with names, else the one --dense_first trained (`dense_model`,
    already loaded). None when neither needs one, and for the dual encoder itself, which ranks on its own."""
    needed = model_args.rerank_with is not None or data_args.pseudo_query_filter_top_k
    if model_args.variant == "dual_encoder" or not needed:
        return None
    source = dense_dir if model_args.rerank_with in (None, "dense_first") else model_args.rerank_with
    try:
        if source == dense_dir and dense_model is not None:
            reranker = DenseReranker(dense_model, ViTT5DSIProcessor.from_pretrained(dense_dir),
                                     model_args.rerank_weight)
        else:
            reranker = load_dense_reranker(source, model_args.rerank_weight)
        reranker.embeddings_for(index)
    except (OSError, ValueError) as err:
        raise UsageError(f"--rerank_with {model_args.rerank_with or 'dense_first'}: {err}") from err
    return reranker


def caption_references(splits) -> dict[str, list[str]]:
    """Held-out image key -> its real captions: the references of caption-quality metrics (never trained on)."""
    references: dict[str, list[str]] = {}
    for key, caption in zip(splits.eval_queries["image_key"][:], splits.eval_queries["caption"][:]):
        references.setdefault(key, []).append(caption)
    return references


def pseudo_queries_for(data_args: DataArguments, splits, images: ImageSource, processor,
                       references: dict[str, list[str]], resume_dir: str | None,
                       training_args: DSITrainingArguments, query_filter=None):
    """The pseudo-queries to train on (a `PseudoQueries` the collator reads) and, for the one-command route, the
    callback that writes them during training. Evaluation captions never enter: the captioner learns from
    training captions only, and a file's rows must name indexed images."""
    keys = splits.index["image_key"][:]
    if data_args.pseudo_query_images == "uncaptioned":
        captioned = set(splits.train_queries["image_key"][:])
        keys = [key for key in keys if key not in captioned]
    if data_args.pseudo_queries:
        store = PseudoQueries.load(data_args.pseudo_queries, known_keys=splits.index["image_key"][:])
        if data_args.pseudo_query_images == "uncaptioned":
            store = PseudoQueries({key: store.for_key(key) for key in keys}, store.source)
        logger.info("Pseudo-queries from %s: %s", data_args.pseudo_queries, store.summary())
        return store, None
    epochs, fractions = pseudo_query_epochs(data_args), pseudo_query_fractions(data_args)
    if not epochs and not fractions:
        return PseudoQueries(), None
    store = PseudoQueries()
    refresh = PseudoQueryRefresh(store, keys, images, processor, epochs, data_args.num_pseudo_queries,
                                 training_args.per_device_eval_batch_size, data_args.pseudo_query_top_k,
                                 progress=training_args.should_log and not training_args.disable_tqdm,
                                 stop_captioning_after_last=not data_args.keep_captioning,
                                 references=references, query_filter=query_filter, fractions=fractions)
    if resume_dir:  # a resumed run trains on the pseudo-queries it had, and refreshes what it had not yet
        refresh.restore(resume_dir, known_keys=splits.index["image_key"][:])
    return store, refresh


def main(argv=None) -> dict[str, float]:
    model_args, data_args, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if training_args.should_log else logging.WARNING,
                        handlers=[logging.StreamHandler(sys.stdout)])
    transformers.utils.logging.set_verbosity_warning()
    recipe = resolve_recipe(model_args, data_args, training_args)
    check_arguments(model_args, data_args, training_args)
    logger.info(recipe)
    resume_dir = training_args.resume_from_checkpoint
    if resume_dir is not None and not os.path.isdir(resume_dir):
        raise UsageError(f"--resume_from_checkpoint {resume_dir}: no such checkpoint directory.")
    if resume_dir is not None and not checkpoint_is_complete(resume_dir):
        raise UsageError(f"--resume_from_checkpoint {resume_dir}: the checkpoint is incomplete (the run stopped while "
                         "writing it, or an older version wrote it). Resume from the one before it.")
    check_output_dir(training_args.output_dir, training_args.overwrite_output_dir, resume_dir is not None,
                     model_args.dense_first)
    with training_args.main_process_first(desc="clearing the previous run"):
        if training_args.overwrite_output_dir and training_args.process_index == 0 and resume_dir is None:
            clear_previous_run(training_args.output_dir, keep_model=not training_args.do_train)
    if training_args.device.type == "cpu":
        training_args.dataloader_pin_memory = False  # pinning only helps copies to an accelerator
    set_seed(training_args.seed)
    logger.info("world size %d, device %s, variant %s", training_args.world_size, training_args.device,
                model_args.variant)

    collection = check_images(collection_for(data_args, training_args.seed, training_args.main_process_first),
                              data_args.skip_bad_images,
                              progress=training_args.should_log and not training_args.disable_tqdm)
    splits = build_dsi_splits(collection, data_args.num_index_images, data_args.num_eval_images,
                              data_args.seen_captions_per_image, tuple(data_args.heldout_splits.split(",")),
                              training_args.seed)
    logger.info("Protocol: %s", splits.summary())
    if training_args.do_train and len(splits.train_queries) == 0:
        raise UsageError(f"Every image of {collection.source} is held out (--heldout_splits "
                         f"{data_args.heldout_splits}, --num_eval_images {data_args.num_eval_images}): no caption is "
                         "left to train retrieval on. Hold out fewer images.")
    if len(splits.index) < training_args.retrieval_k:
        raise UsageError(f"--retrieval_k {training_args.retrieval_k} is larger than the {len(splits.index)} indexed "
                         "images.")

    dense_dir, dense_metrics = None, {}
    if model_args.dense_first:
        dense_dir, dense_metrics = train_dense_first(model_args, data_args, training_args, collection, splits)
    final_metrics = train_and_evaluate(model_args, data_args, training_args, collection, splits, resume_dir,
                                       dense_dir, dense_metrics)
    end_distributed_run()
    return final_metrics


def train_dense_first(model_args, data_args, training_args, collection, splits) -> tuple[str, dict[str, float]]:
    """--dense_first: the dual encoder's run in OUTPUT_DIR/dual_encoder (reused when finished, resumed from its
    last checkpoint when interrupted). Returns its directory and its metrics, prefixed dense_."""
    d_model_args, d_data_args, d_training_args = dense_stage_arguments(model_args, data_args, training_args)
    directory = d_training_args.output_dir
    if finished_dense_model(directory):
        logger.info("--dense_first: reusing the dual encoder already trained in %s.", directory)
        with open(os.path.join(directory, "all_results.json"), encoding="utf-8") as f:
            metrics = json.load(f)
    else:
        logger.info("--dense_first: training the dual encoder for %g epochs in %s%s.",
                    d_training_args.num_train_epochs, directory,
                    f" (resuming from {d_training_args.resume_from_checkpoint})"
                    if d_training_args.resume_from_checkpoint else "")
        metrics = train_and_evaluate(d_model_args, d_data_args, d_training_args, collection, splits,
                                     d_training_args.resume_from_checkpoint)
        finish_tracking_run(training_args)
        if training_args.process_index == 0:
            remove_checkpoints(directory)
    PartialState().wait_for_everyone()  # every process reads the finished dual encoder from here on
    return directory, {f"dense_{key}": value for key, value in metrics.items()
                       if key.split("_", 1)[0] in ("eval", "seen", "index", "train")}


def finish_tracking_run(training_args) -> None:
    """Close the dense stage's wandb run, so the generative model's curves start a run of their own."""
    if "wandb" in (training_args.report_to or []) and training_args.process_index == 0:
        import wandb

        if wandb.run is not None:
            wandb.finish()


def train_and_evaluate(model_args, data_args, training_args, collection, splits, resume_dir: str | None,
                       dense_dir: str | None = None, dense_metrics: dict[str, float] | None = None
                       ) -> dict[str, float]:
    """One model: build (or load) it and its ids, train, evaluate, save results, card and protocol."""
    # Seeded here, per model: the generative model then starts the same whether the dense stage before it was
    # trained in this process or reused from an earlier, interrupted run (training it consumes random numbers).
    set_seed(training_args.seed)
    model, processor = model_and_processor(model_args, data_args, splits.train_queries["caption"][:], resume_dir,
                                           dense_dir)
    dense_model = load_dsi_model(dense_dir) if dense_dir else None  # towers to start from, re-ranker, filter
    if dense_model is not None and model_args.start_from_dense and resume_dir is None:
        copied = start_from_dense(model, dense_model)
        logger.info("The generative model starts from the dual encoder's image tower, T5 encoder and token "
                    "embeddings (%d tensors, --start_from_dense).", copied)
    captioning = data_args.captioning_ratio > 0 or getattr(model.config, "caption_token_id", None) is not None
    if captioning:
        model.enable_captioning(processor.tokenizer)
    vocabulary = check_identical_on_every_process(processor.tokenizer.get_vocab(), "caption tokenizer vocabulary")
    if training_args.world_size > 1:
        logger.info("Tokenizer vocabulary identical on all %d processes (digest %s)", training_args.world_size,
                    vocabulary)
    if model_args.model_name_or_path is None and resume_dir is None:
        logger.info("Model: %s, %.1fM parameters", type(model).__name__, model.num_parameters() / 1e6)

    images = ImageSource(splits.index)
    index = image_index_for(model_args, model, processor, splits, images, resume_dir, training_args, dense_dir)
    index.record_image_paths([images.path(key) for key in index.keys])  # where the pipeline and app find them
    index.check_tokenizer(processor.tokenizer)
    check_identical_on_every_process(index.to_dict(), "image index")
    index.resize_model_embeddings(model)
    if model_args.rq_code_embeddings and initialise_code_embeddings(index, model, training_args.seed):
        logger.info("rq code tokens start at their codes' vectors (--rq_code_embeddings).")
    model.image_index = index
    if captioning:  # captions never contain identifier-only tokens (kept in the config for every later caption)
        model.config.caption_suppress_token_ids = index.identifier_only_token_ids(
            processor.tokenizer(splits.train_queries["caption"][:], add_special_tokens=False)["input_ids"])

    reranker = dense_reranker(model_args, data_args, index, dense_dir, dense_model)
    references = caption_references(splits)
    # check_arguments made sure a dual encoder exists when the filter is on
    query_filter = (RoundTripFilter(reranker, index, data_args.pseudo_query_filter_top_k)
                    if data_args.pseudo_query_filter_top_k and reranker is not None else None)
    store, refresh = pseudo_queries_for(data_args, splits, images, processor, references, resume_dir, training_args,
                                        query_filter)
    slots = {key: len(store.for_key(key)) for key in store.queries} if refresh is None else {
        key: data_args.pseudo_query_rows_per_image or data_args.num_pseudo_queries for key in refresh.keys}
    train_dataset = training_stream(splits, model.config.variant, data_args.indexing_ratio, training_args.seed,
                                    data_args.captioning_ratio, slots) if training_args.do_train else None
    pseudo_rows = sum(slots.values())
    if train_dataset is not None and pseudo_rows:
        logger.info("Pseudo-query rows: %d of the %d rows of each epoch (%.0f%%), for %d images.", pseudo_rows,
                    len(train_dataset), 100 * pseudo_rows / len(train_dataset), len(slots))
    trainer = DSITrainer(
        model=model, args=training_args, images=images, processing_class=processor, augment=data_args.augment,
        train_dataset=train_dataset, eval_dataset=evaluation_sets(splits, data_args.max_index_eval_images),
        pseudo_queries=store, caption_references=references if captioning else None,
        callbacks=[refresh] if refresh is not None else None,
        reranker=reranker if model_args.rerank_with is not None else None,
        image_cache_mb=data_args.image_cache_mb)
    description = (f"built-in synthetic scenes ({len(collection)} images)" if data_args.is_demo else
                   f"{collection.source}: {splits.summary()}")

    final_metrics: dict[str, float] = {}
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=resume_dir)
        trainer.save_model()
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
        final_metrics.update(result.metrics)

    if dense_metrics:  # the dense stage's figures beside the generative ones (all_results.json, card, table)
        trainer.save_metrics("dense", dense_metrics)
        final_metrics.update(dense_metrics)
    if training_args.do_eval:
        metrics = trainer.evaluate()
        metrics["world_size"] = training_args.world_size
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        final_metrics.update(metrics)
        if trainer.is_world_process_zero():
            print("\n" + metrics_table({**dense_metrics, **metrics} if dense_metrics else metrics) + "\n",
                  flush=True)

    if trainer.is_world_process_zero():
        if training_args.do_train:  # the card describes the model saved in output_dir
            trainer.create_model_card(dataset=description, dataset_tags=data_args.dataset_name)
        atomic_write_text(os.path.join(training_args.output_dir, "protocol.json"), json.dumps({
            "source": collection.source, "num_indexed": len(splits.index),
            "num_train_queries": len(splits.train_queries), "num_eval_queries": len(splits.eval_queries),
            "num_seen_queries": len(splits.seen_queries), "variant": model.config.variant,
            "docid_scheme": index.scheme, "docid_scheme_info": index.scheme_info,
            "id_embeddings": ("dense_first: " + dense_dir if dense_dir else model_args.semantic_embeddings or
                              "the model's image tower") if index.scheme in EMBEDDING_SCHEMES else None,
            "rerank_with": ({"model": dense_dir if model_args.rerank_with == "dense_first" else
                             model_args.rerank_with, "weight": model_args.rerank_weight}
                            if model_args.rerank_with else None),
            "captioning_rows_per_epoch": round(data_args.captioning_ratio * len(splits.train_queries))
            if model.config.variant != "dual_encoder" else 0,
            "rows_per_epoch": len(train_dataset) if train_dataset is not None else 0,
            "pseudo_query_rows_per_epoch": pseudo_rows,
            "pseudo_queries": {**store.summary(), "images": data_args.pseudo_query_images,
                               "epochs": refresh.epochs if refresh is not None else [],
                               "at_fractions": pseudo_query_fractions(data_args),
                               "filter_top_k": data_args.pseudo_query_filter_top_k or 0}}, indent=2))
        if len(store):
            store.save(os.path.join(training_args.output_dir, PSEUDO_QUERIES_FILE))
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset=description, dataset_tags=data_args.dataset_name)
    return final_metrics


def cli() -> None:
    """Entry point: usage errors print one line and exit 2; anything else keeps its traceback."""
    try:
        main()
    except UsageError as err:
        print(f"{os.path.basename(sys.argv[0])}: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except OSError as err:  # Trainer's own writes (trainer_state.json, results) on a full disk: one line too
        code = disk_full_errno(err)
        if code is None:
            raise
        print(f"{os.path.basename(sys.argv[0])}: error: {err.filename or 'a file'}: {os.strerror(code)}",
              file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    cli()
