#!/usr/bin/env python
"""Draw the built-in synthetic collection (PNGs + a Karpathy-layout JSON) for run_dsi_image.py.

    python data_scripts/make_synthetic_scenes.py --output_dir scenes --num_images 10000
    accelerate launch run_dsi_image.py --karpathy_json scenes/dataset_synthetic.json --image_dir scenes/images
"""

import argparse

from vit_t5_dsi.data.synthetic_scenes import generate_scenes


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="Where images/ and dataset_synthetic.json go.")
    parser.add_argument("--num_images", type=int, default=1000, help="100 to 100,000 (more with 3 objects).")
    parser.add_argument("--image_size", type=int, default=64, help="Square size in pixels.")
    parser.add_argument("--max_objects", type=int, default=3, help="Objects per image, 1 to 3.")
    parser.add_argument("--captions_per_image", type=int, default=3, help="Differently worded captions (>= 3).")
    parser.add_argument("--heldout_fraction", type=float, default=0.1,
                        help="Share of images in split 'test' (and as many in 'val').")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    path = generate_scenes(args.output_dir, args.num_images, args.image_size, args.seed, args.max_objects,
                           args.captions_per_image, args.heldout_fraction)
    print(path)


if __name__ == "__main__":
    main()
