#!/usr/bin/env python
"""Add images to, or remove images from, a trained vit-t5-dsi checkpoint without retraining it.

    python update_index.py --model_name_or_path dsi_demo_output --add_images new_photos/ --output_dir dsi_updated
    python update_index.py --model_name_or_path dsi_demo_output --add_images new.json --image_dir images \\
        --update_steps 150 --replay_captions train_captions.jsonl --output_dir dsi_updated
    python update_index.py --model_name_or_path dsi_updated --remove_images gone.txt --overwrite_output_dir
    python run_dsi_image.py --model_name_or_path dsi_updated --do_train False --karpathy_json all.json \\
        --image_dir images --output_dir eval_updated         # evaluate it on a collection it now covers

The updated checkpoint is written atomically (the old one stays loadable until the new one is complete). Updating
the checkpoint in place needs --overwrite_output_dir; another --output_dir must be new or empty. docs/adding_images.md
describes the design and its benchmark. A usage error prints one line and exits with status 2.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from vit_t5_dsi.checkpoint.checkpoint_io import UsageError


@dataclass
class UpdateArguments:
    model_name_or_path: str = field(metadata={"help": "The trained checkpoint directory to update."})
    output_dir: str | None = field(default=None, metadata={
        "help": "Where the updated checkpoint goes (new or empty). Default: the checkpoint itself, which needs "
                "--overwrite_output_dir."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Update the checkpoint in place, or replace a non-empty --output_dir."})
    add_images: str | None = field(default=None, metadata={
        "help": "Images to add: a folder of image files (keys: paths relative to it), one image file, a Karpathy "
                ".json (with --image_dir), a prototype .jsonl of {image_id, image} rows, or a folder of parquet "
                "files. Captions they carry are ignored (they never train)."})
    image_dir: str | None = field(default=None, metadata={
        "help": "--add_images FILE.json/.jsonl: the folder their image paths are relative to."})
    remove_images: str | None = field(default=None, metadata={
        "help": "Keys to remove: comma-separated, or a text file with one key per line. Applied before "
                "--add_images."})
    update_steps: int = field(default=0, metadata={
        "help": "Short update after adding (optimizer steps on the new images' own pseudo-queries and indexing "
                "rows, plus replayed old rows); 0 = ids and trie only."})
    replay_captions: str | None = field(default=None, metadata={
        "help": "JSONL of {image_id, caption}: the old collection's training captions, replayed by the short "
                "update so that old images are not forgotten (the checkpoint's stored pseudo-queries and its "
                "images' indexing rows are replayed too)."})
    replay_ratio: float = field(default=2.0, metadata={"help": "Replayed old rows per new row in the short update."})
    learning_rate: float = field(default=5e-4, metadata={"help": "Short update: peak learning rate (linear warm-up and decay)."})
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Short update and embedding batch."})
    dual_encoder: str | None = field(default=None, metadata={
        "help": "The dual encoder that embeds new images (default: the checkpoint's dual_encoder/ folder)."})
    seed: int = field(default=42, metadata={"help": "Seed of the pseudo-queries and of the short update."})
    evaluate: bool = field(default=True, metadata={
        "help": "Record the new and old images' index Hits@1 (image -> id) in the update log and model card."})


def main(argv=None) -> list[dict]:
    parser = HfArgumentParser(UpdateArguments)
    if argv is None and len(sys.argv) == 2 and sys.argv[1].endswith((".json", ".yaml", ".yml")):
        (args,) = (parser.parse_json_file(sys.argv[1]) if sys.argv[1].endswith(".json")
                   else parser.parse_yaml_file(sys.argv[1]))
    else:
        (args,) = parser.parse_args_into_dataclasses(argv)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO, handlers=[logging.StreamHandler(sys.stdout)])
    from vit_t5_dsi import add_images, remove_images

    if not args.add_images and not args.remove_images:
        raise UsageError("Nothing to do: pass --add_images and/or --remove_images.")
    if args.update_steps and not args.add_images:
        raise UsageError("--update_steps trains on added images: pass --add_images.")
    source, records = args.model_name_or_path, []
    if args.remove_images:
        keys = (args.remove_images if os.path.isfile(args.remove_images)
                else [k.strip() for k in args.remove_images.split(",") if k.strip()])
        records.append(remove_images(source, keys, output_dir=args.output_dir,
                                     overwrite_output_dir=args.overwrite_output_dir, dual_encoder=args.dual_encoder))
        source = args.output_dir or source
    if args.add_images:
        same = os.path.abspath(args.output_dir or source) == os.path.abspath(source)
        records.append(add_images(source, args.add_images, output_dir=args.output_dir or source,
                                  overwrite_output_dir=args.overwrite_output_dir or (same and bool(records)),
                                  update_steps=args.update_steps, replay_captions=args.replay_captions,
                                  image_dir=args.image_dir, dual_encoder=args.dual_encoder,
                                  learning_rate=args.learning_rate, replay_ratio=args.replay_ratio,
                                  batch_size=args.per_device_train_batch_size, seed=args.seed,
                                  evaluate=args.evaluate))
    print(json.dumps(records, indent=1), flush=True)
    return records


def cli() -> None:
    """Entry point: usage errors print one line and exit 2."""
    try:
        main()
    except UsageError as err:
        print(f"{os.path.basename(sys.argv[0])}: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    cli()
