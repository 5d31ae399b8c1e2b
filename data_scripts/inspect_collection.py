#!/usr/bin/env python
"""Check a collection and show the DSI protocol it yields, without training: a dry run of the data flags.

    python data_scripts/inspect_collection.py --karpathy_json dataset_flickr30k.json --image_dir flickr30k-images \
        --num_index_images 10000 --num_eval_images 2000
    python data_scripts/inspect_collection.py --dataset_name /data/flickr30k-parquet
    python data_scripts/inspect_collection.py --train_file train.jsonl --validation_file validation.jsonl

Takes the same data flags as run_dsi_image.py; exits non-zero with the file and item at fault on bad input.
"""

import logging
import sys

from transformers import HfArgumentParser

from vit_t5_dsi.training.arguments import DataArguments
from vit_t5_dsi.data.collection import check_images, load_collection
from vit_t5_dsi.checkpoint.checkpoint_io import CollectionError
from vit_t5_dsi.data.splits import build_dsi_splits


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s - %(message)s")
    (data_args, rest) = HfArgumentParser(DataArguments).parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True)
    seed = 42
    if rest:
        print(f"unknown arguments: {rest}", file=sys.stderr)
        return 2
    try:
        collection = load_collection(data_args.karpathy_json, data_args.image_dir, data_args.dataset_name,
                                     data_args.train_file, data_args.validation_file)
        collection = check_images(collection, data_args.skip_bad_images)
        splits = build_dsi_splits(collection, data_args.num_index_images, data_args.num_eval_images,
                                  data_args.seen_captions_per_image, tuple(data_args.heldout_splits.split(",")), seed)
    except CollectionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{collection.source}: {len(collection)} images, {len(collection.captions)} captions")
    print(f"protocol (seed {seed}): {splits.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
