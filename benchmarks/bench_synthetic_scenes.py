#!/usr/bin/env python
"""Throughput of the synthetic-scene generator (drawing + PNG writing + captions) on one core.

Target: >= 2,000 images/s at 64 px. Prints images/s per size and object count side by side.

    python benchmarks/bench_synthetic_scenes.py --num_images 5000
"""

import argparse
import tempfile
import time

from vit_t5_dsi.data.synthetic_scenes import generate_scenes


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=5000)
    args = parser.parse_args()
    print(f"{'size px':>8}{'objects':>9}{'images':>8}{'seconds':>9}{'images/s':>10}  target (64 px: >= 2000/s)")
    for size in (32, 64, 128):
        for objects in (1, 3):
            n = min(args.num_images, 500) if objects == 1 else args.num_images
            with tempfile.TemporaryDirectory() as directory:
                start = time.perf_counter()
                generate_scenes(directory, n, image_size=size, seed=0, max_objects=objects, progress=False)
                seconds = time.perf_counter() - start
            rate = n / seconds
            verdict = ("met" if rate >= 2000 else "MISSED") if size == 64 else ""
            print(f"{size:>8}{objects:>9}{n:>8}{seconds:>9.2f}{rate:>10.0f}  {verdict}")


if __name__ == "__main__":
    main()
