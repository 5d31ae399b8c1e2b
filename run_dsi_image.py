#!/usr/bin/env python
"""Train and evaluate a generative text-to-image retriever (ViT + T5 DSI) or its dual-encoder baseline.

    accelerate launch run_dsi_image.py                      # built-in demo: synthetic scenes, tiny model
    accelerate launch run_dsi_image.py --karpathy_json dataset_flickr30k.json --image_dir flickr30k-images \\
        --vision_model_name_or_path google/vit-base-patch16-224-in21k --text_model_name_or_path t5-base \\
        --num_index_images 10000 --num_eval_images 2000 --bf16 --output_dir dsi-flickr30k
    python run_dsi_image.py config.yaml                     # every flag from one JSON or YAML file
    python run_dsi_image.py --model_name_or_path CKPT --do_train False --validation_file queries.jsonl \
        --output_dir eval_queries                           # a trained checkpoint on new queries

Every flag is documented in `--help`. This script holds the wiring; the logic lives in the `vit_t5_dsi` package.
A usage error (bad data, a bad flag combination) prints one line and exits with status 2.
"""

from __future__ import annotations

import logging
import os
import sys

from vit_t5_dsi.checkpoint.checkpoint_io import disk_full_errno, UsageError
from vit_t5_dsi.data.rows import ImageSource, evaluation_sets, training_stream
from vit_t5_dsi.training.argument_checks import check_arguments
from vit_t5_dsi.training.arguments import parse_args
from vit_t5_dsi.training.dense_stage import dense_reranker, start_from_dense, train_dense_stage
from vit_t5_dsi.training.distributed import end_distributed_run
from vit_t5_dsi.training.pseudo_queries import RoundTripFilter, pseudo_queries_for, pseudo_query_slots
from vit_t5_dsi.training.query_file_evaluation import evaluate_query_file
from vit_t5_dsi.training.recipe import resolve_recipe
from vit_t5_dsi.training.run_identifiers import attach_index, identifiers_for
from vit_t5_dsi.training.run_record import protocol, write_run_record
from vit_t5_dsi.training.run_steps import (build_model_and_processor, checkpoint_to_resume, collection_description,
                                           configure_logging, load_collection_and_splits, prepare_output_dir,
                                           train_and_evaluate)
from vit_t5_dsi.training.trainer import DSITrainer

logger = logging.getLogger("run_dsi_image")


def main(argv=None) -> dict[str, float]:
    # 1. flags, and the recipe they leave open filled in
    model_args, data_args, training_args = parse_args(argv)
    configure_logging(training_args)
    logger.info(resolve_recipe(model_args, data_args, training_args))
    check_arguments(model_args, data_args, training_args)
    resume_dir = checkpoint_to_resume(training_args)
    prepare_output_dir(model_args, training_args, resume_dir)
    logger.info("world size %d, device %s, variant %s", training_args.world_size, training_args.device,
                model_args.variant)

    # 2. data: the collection and the protocol's splits (a query file's evaluation needs only the checkpoint)
    if data_args.evaluates_query_file:
        metrics = evaluate_query_file(model_args, data_args, training_args)
        end_distributed_run()
        return metrics
    collection, splits = load_collection_and_splits(data_args, training_args)
    images = ImageSource(splits.index)

    # 3. the dense stage (a dual encoder: the generative model's ids, towers, re-ranker and query filter)
    dense = train_dense_stage(model_args, data_args, training_args, collection, splits) if model_args.dense_first \
        else None

    # 4. the model, started from the dual encoder's towers
    model, processor = build_model_and_processor(
        model_args, data_args, training_args, splits,
        resume_dir or model_args.model_name_or_path or (dense.directory if dense else None))
    if dense is not None and model_args.start_from_dense and resume_dir is None:
        logger.info("The generative model starts from the dual encoder's image tower, T5 encoder and token "
                    "embeddings (%d tensors, --start_from_dense).", start_from_dense(model, dense.model))
    captioning = model.config.is_generative and (data_args.captioning_ratio > 0
                                                 or model.config.caption_token_id is not None)
    if captioning:
        model.enable_captioning(processor.tokenizer)

    # 5. identifiers
    index = identifiers_for(model_args, training_args, model, processor, splits, images,
                            dense.directory if dense else None)
    attach_index(model, processor, index, images, model_args, training_args)
    train_captions = splits.train_queries["caption"][:]
    if captioning:  # captions never contain identifier-only tokens (kept in the config for every later caption)
        model.config.caption_suppress_token_ids = index.identifier_only_token_ids(
            processor.tokenizer(train_captions, add_special_tokens=False)["input_ids"])

    # 6. what trains beside the real captions: pseudo-queries, kept where the dual encoder finds their image
    reranker = dense_reranker(model_args, data_args, index, dense)
    references = splits.held_out_captions()
    query_filter = (RoundTripFilter(reranker, index, data_args.pseudo_query_filter_top_k, training_captions=(
                        splits.training_captions() if data_args.pseudo_query_drop_copies else None))
                    if data_args.pseudo_query_filter_top_k and reranker is not None else None)
    pseudo_queries, refresh = pseudo_queries_for(data_args, training_args, splits, images, processor, references,
                                                 query_filter)
    slots = pseudo_query_slots(pseudo_queries, refresh, data_args)
    train_dataset = (training_stream(splits, model.config.variant, data_args.indexing_ratio, training_args.seed,
                                     data_args.captioning_ratio, slots) if training_args.do_train else None)
    if train_dataset is not None and slots:
        logger.info("Pseudo-query rows: %d of the %d rows of each epoch (%.0f%%), for %d images.", sum(slots.values()),
                    len(train_dataset), 100 * sum(slots.values()) / len(train_dataset), len(slots))

    # 7. train, evaluate, save
    trainer = DSITrainer(
        model=model, args=training_args, images=images, processing_class=processor, augment=data_args.augment,
        train_dataset=train_dataset, eval_dataset=evaluation_sets(splits, data_args.max_index_eval_images),
        pseudo_queries=pseudo_queries, caption_references=references if captioning else None,
        callbacks=[refresh] if refresh is not None else None,
        reranker=reranker if model_args.rerank_with is not None else None, image_cache_mb=data_args.image_cache_mb,
        queries_during_training=data_args.eval_queries_during_training)
    metrics = train_and_evaluate(trainer, training_args, dense.metrics if dense else None)

    # 8. the run's record beside the model: card, protocol.json, pseudo-queries; the push
    record = protocol(collection=collection, splits=splits, model=model, model_args=model_args, data_args=data_args,
                      dense_dir=dense.directory if dense else None,
                      rows_per_epoch=len(train_dataset) if train_dataset is not None else 0,
                      pseudo_query_rows=sum(slots.values()), pseudo_queries=pseudo_queries, refresh=refresh)
    write_run_record(trainer, training_args, collection_description(data_args, collection, splits),
                     data_args.dataset_name, record, pseudo_queries)
    end_distributed_run()
    return metrics


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
