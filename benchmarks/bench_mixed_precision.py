#!/usr/bin/env python
"""Training-step and constrained-generation speed at realistic widths, fp32 vs bf16, side by side.

Random weights at `--size base` (ViT-B/16 + T5-base widths, 224 px) on a GPU; `--size tiny` smoke-tests it on a
CPU. Prints one table: steps/s, peak memory, loss finiteness per precision, and the bf16/fp32 ratios; then
constrained beam search (10 beams, 10 returned) over `--num_ids` naive ids for a batch of caption queries.

    python benchmarks/bench_mixed_precision.py --size base --batch_size 32 --steps 20        # one GPU
    python benchmarks/bench_mixed_precision.py --size tiny --batch_size 8 --steps 3 --num_ids 1000   # CPU smoke
"""

import argparse
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_constrained_decoding import naive_ids  # noqa: E402

from vit_t5_dsi import ViTT5DSIConfig, ViTT5DSIForConditionalGeneration  # noqa: E402
from vit_t5_dsi.checkpoint.image_index import ImageIndex  # noqa: E402
from vit_t5_dsi.checkpoint.ranking import rank_by_generation  # noqa: E402


def train_steps(model, config, batch_size, steps, dtype, device):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    size = config.image_size
    pixels = torch.randn(batch_size // 2, 3, size, size, device=device)
    input_ids = torch.randint(3, 1000, (batch_size - batch_size // 2, 24), device=device)
    labels = torch.randint(10, 20, (batch_size, 8), device=device)
    labels[:, -1] = 1
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses, start = [], None
    for step in range(steps + 2):  # two warm-up steps
        if step == 2:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(pixel_values=pixels, input_ids=input_ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    memory = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
    return steps / seconds, memory, all(map(lambda x: x == x and abs(x) != float("inf"), losses))


@torch.no_grad()
def generation_seconds(model, index, batch_size, dtype, device, repeats=3):
    input_ids = torch.randint(3, 1000, (batch_size, 24), device=device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            rank_by_generation(model, index, k=10, input_ids=input_ids)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="base", choices=["tiny", "small", "base"])
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--num_ids", type=int, default=100_000)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, size {args.size}")

    sequences = naive_ids(args.num_ids)
    index = ImageIndex([str(i) for i in range(args.num_ids)], [str(i) for i in range(args.num_ids)], sequences,
                       "naive", eos_token_id=1, pad_token_id=0)
    rows = []
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        torch.manual_seed(0)
        config = ViTT5DSIConfig.from_preset(args.size, vocab_size=32128 if args.size == "base" else 4096)
        model = ViTT5DSIForConditionalGeneration(config).to(device)
        steps_per_s, memory, finite = train_steps(model, config, args.batch_size, args.steps, dtype, device)
        model.eval()
        generate_s = generation_seconds(model, index, args.batch_size, dtype, device)
        rows.append((name, steps_per_s, memory, finite, generate_s))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\n{'precision':<10}{'train steps/s':>14}{'peak GiB':>10}{'finite loss':>12}"
          f"{'generate s (batch, 10 beams, ' + format(args.num_ids, ',') + ' ids)':>48}")
    for name, steps_per_s, memory, finite, generate_s in rows:
        print(f"{name:<10}{steps_per_s:>14.2f}{memory:>10.2f}{str(finite):>12}{generate_s:>48.3f}")
    (_, fp32_steps, fp32_mem, _, fp32_gen), (_, bf16_steps, bf16_mem, _, bf16_gen) = rows
    print(f"{'bf16/fp32':<10}{bf16_steps / fp32_steps:>14.2f}{bf16_mem / fp32_mem:>10.2f}{'':>12}"
          f"{bf16_gen / fp32_gen:>48.2f}")


if __name__ == "__main__":
    main()
