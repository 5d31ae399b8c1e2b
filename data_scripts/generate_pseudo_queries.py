#!/usr/bin/env python
"""Write pseudo-queries (sampled captions) for a collection's images with a trained captioning checkpoint.

    python data_scripts/generate_pseudo_queries.py --model dsi_demo_output --num_queries 10 \\
        --output pseudo_queries.jsonl                                  # built-in demo collection
    python data_scripts/generate_pseudo_queries.py --model ckpt --karpathy_json dataset_flickr30k.json \\
        --image_dir flickr30k-images --num_eval_images 2000 --images uncaptioned --output pq.jsonl
    accelerate launch run_dsi_image.py ... --pseudo_queries pq.jsonl

Takes the data flags of run_dsi_image.py (and the same --seed, so the same images are held out). The output is
JSONL, one {"image_id", "caption", "source"} row per query, appended batch by batch: an interrupted run started
again with the same --output continues where it stopped. Usage errors print one line and exit 2.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Literal

import torch
from tqdm.auto import tqdm
from transformers import HfArgumentParser, set_seed

from vit_t5_dsi import ViTT5DSIProcessor, load_dsi_model
from vit_t5_dsi.training.arguments import DataArguments
from vit_t5_dsi.data.collection import check_images
from vit_t5_dsi.data.collection_from_flags import collection_for
from vit_t5_dsi.data.rows import ImageSource
from vit_t5_dsi.data.splits import build_dsi_splits
from vit_t5_dsi.checkpoint.checkpoint_io import UsageError
from vit_t5_dsi.training.pseudo_queries import PseudoQueries, generate_pseudo_queries


@dataclass
class GenerationArguments:
    model: str = field(metadata={"help": "A vit-t5-dsi checkpoint trained with captioning (--captioning_ratio > 0)."})
    output: str = field(metadata={"help": "JSONL file to write (appended to, so an interrupted run resumes)."})
    num_queries: int = field(default=10, metadata={"help": "Captions sampled per image, before deduplication."})
    images: Literal["all", "uncaptioned"] = field(default="all", metadata={
        "help": "all indexed images, or only those without training captions (the held-out ones)."})
    top_k: int = field(default=20, metadata={"help": "Top-k sampling."})
    batch_size: int = field(default=32, metadata={"help": "Images per generation batch."})
    seed: int = field(default=42, metadata={"help": "The training run's --seed (the same held-out images)."})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, ... (default: cuda if available)."})


RETRIES = 3  # extra samplings for an image whose every sampled caption was empty


def completed_keys(path: str) -> set[str]:
    """Image keys already written; a torn last line (a crash mid-write) is cut off so appending stays valid."""
    if not os.path.exists(path):
        return set()
    done, good_bytes = set(), 0
    with open(path, "rb") as f:
        for line in f:
            try:
                done.add(str(json.loads(line)["image_id"]))
            except (ValueError, KeyError, TypeError):
                break
            good_bytes += len(line)
    with open(path, "rb+") as f:
        f.truncate(good_bytes)
    return done


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s - %(message)s")
    args, data_args = HfArgumentParser((GenerationArguments, DataArguments)).parse_args_into_dataclasses(args=argv)
    if args.num_queries < 1:
        raise UsageError(f"--num_queries must be >= 1, got {args.num_queries}.")
    set_seed(args.seed)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_dsi_model(args.model).to(device)
    if getattr(model.config, "caption_token_id", None) is None:
        raise UsageError(f"--model {args.model} was not trained to caption (train it with --captioning_ratio > 0).")
    processor = ViTT5DSIProcessor.from_pretrained(args.model)
    collection = check_images(collection_for(data_args, args.seed), data_args.skip_bad_images, progress=False)
    splits = build_dsi_splits(collection, data_args.num_index_images, data_args.num_eval_images,
                              data_args.seen_captions_per_image, tuple(data_args.heldout_splits.split(",")),
                              args.seed)
    keys = splits.index["image_key"][:]
    if args.images == "uncaptioned":
        captioned = set(splits.train_queries["image_key"][:])
        keys = [key for key in keys if key not in captioned]
    done = completed_keys(args.output)
    todo = [key for key in keys if key not in done]
    source = f"{args.model}, {args.num_queries} samples per image, top-k {args.top_k}"
    images = ImageSource(splits.index)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "a", encoding="utf-8") as out, tqdm(total=len(keys), initial=len(keys) - len(todo),
                                                              desc="Pseudo-queries") as bar:
        for start in range(0, len(todo), args.batch_size):
            batch = todo[start:start + args.batch_size]
            queries = generate_pseudo_queries(model, batch, images, processor, args.num_queries, args.batch_size,
                                              device, args.top_k, distributed=False)
            for _ in range(RETRIES):  # every sample empty (the caption ended at once): sample those images again
                empty = [key for key in batch if key not in queries]
                if not empty:
                    break
                queries.update(generate_pseudo_queries(model, empty, images, processor, args.num_queries,
                                                       args.batch_size, device, args.top_k, distributed=False))
            missing = [key for key in batch if key not in queries]
            if missing:
                logging.warning("%d images got only empty captions in %d tries (e.g. %s): none written for them; a "
                                "rerun tries them again.", len(missing), RETRIES + 1, missing[0])
            out.write(PseudoQueries(queries, source).to_jsonl())
            out.flush()
            os.fsync(out.fileno())
            bar.update(len(batch))
    written = PseudoQueries.load(args.output)
    print(f"{args.output}: {written.summary()}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UsageError as err:
        print(f"{os.path.basename(sys.argv[0])}: error: {err}", file=sys.stderr)
        sys.exit(2)
