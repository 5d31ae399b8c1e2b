#!/usr/bin/env python
"""Train the offline caption tokenizer on a Karpathy-layout file and save it (AutoTokenizer reloads it).

    python data_scripts/train_caption_tokenizer.py --karpathy_json scenes/dataset_synthetic.json --output_dir tok
"""

import argparse

from vit_t5_dsi.data.caption_tokenizer import train_caption_tokenizer
from vit_t5_dsi.data.collection import load_karpathy


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--karpathy_json", required=True, help="Captions to train on (all splits' captions).")
    parser.add_argument("--output_dir", required=True, help="Where tokenizer.json and its config go.")
    parser.add_argument("--vocab_size", type=int, default=1024)
    args = parser.parse_args()
    captions = load_karpathy(args.karpathy_json, image_dir=".").captions["caption"][:]
    train_caption_tokenizer(captions, args.vocab_size).save_pretrained(args.output_dir)
    print(args.output_dir)


if __name__ == "__main__":
    main()
