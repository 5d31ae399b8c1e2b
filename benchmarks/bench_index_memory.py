#!/usr/bin/env python
"""What an image index costs at catalogue scale: RAM, disk and load time of `ImageIndex` and its decoding
constraint (issue #25, "Search at catalogue scale").

Identifiers are rq ids of 4 levels x 256 codes (one token per (level, code), uneven code frequencies, a fifth
position token only for images that share all four codes); keys are COCO-style file names ("000000391895.jpg",
16 bytes). Every figure is measured in a fresh process:

  write   build the index from its token table (`ImageIndex.from_token_table`) and save it (columns layout);
  load    `ImageIndex.load` from disk: seconds (wall and CPU; the fastest of `--repeats` fresh processes, as the
          machine may be shared), peak RSS growth, and the bytes it holds (tracemalloc, in a second
          fresh process so that tracing does not slow the timed load), then the constraint (`index.trie`): its
          build seconds and the bytes it holds;
  build   at `--build_images` (10M): index + constraint from an in-memory (N, 5) int32 token table and a keys
          array: seconds and peak RSS (sampled every 5 ms), of the process and beyond the inputs;
  before  (unless --no_baseline) the same load with the code of `--baseline_rev` (before issue #25) and its JSON
          layout, imported from git into a temporary package.

Targets: whole index <= 40 B/image, constraint <= 16 B/image, files <= 32 B/image, load <= 2 s (1M ids); index +
constraint built from a 10M-id table in <= 60 s with a process peak <= 2 GB.

    python benchmarks/bench_index_memory.py                              # 1M and 10M ids, and the baseline
    python benchmarks/bench_index_memory.py --num_images 100000 --build_images 1000000 --no_baseline
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_TOKEN = 32128  # code tokens come after T5's 32K vocabulary, as `tokenizer.add_tokens` places them
LEVELS, CODES = 4, 256
EOS, PAD = 1, 0


# ----- what runs in the child processes ---------------------------------------------------------------------

def rq_table(n: int, seed: int = 0):
    """(n, 5) int32 rq token table, its lengths, and token -> string for the id strings."""
    import numpy as np

    rng = np.random.default_rng(seed)
    codes = np.stack([rng.choice(CODES, size=n, p=rng.dirichlet(np.full(CODES, 2.0))).astype(np.int64)
                      for _ in range(LEVELS)], axis=1)
    cell = np.zeros(n, dtype=np.int64)
    for level in range(LEVELS):
        cell = (cell << 8) | codes[:, level]
    order = np.argsort(cell, kind="stable")
    sorted_cells = cell[order]
    del cell
    starts = np.flatnonzero(np.r_[True, sorted_cells[1:] != sorted_cells[:-1]])
    sizes = np.diff(np.r_[starts, n])
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n) - np.repeat(starts, sizes)
    shared = np.empty(n, dtype=bool)
    shared[order] = np.repeat(sizes > 1, sizes)
    del order, sorted_cells
    table = np.empty((n, LEVELS + 1), dtype=np.int32)
    table[:, :LEVELS] = BASE_TOKEN + np.arange(LEVELS) * CODES + codes
    table[:, LEVELS] = np.where(shared, BASE_TOKEN + LEVELS * CODES + position, -1)
    lengths = np.where(shared, LEVELS + 1, LEVELS)
    pieces = {BASE_TOKEN + level * CODES + code: f"<l{level}_c{code}>" for level in range(LEVELS)
              for code in range(CODES)}
    pieces.update({BASE_TOKEN + LEVELS * CODES + p: f"<l{LEVELS}_c{p}>" for p in range(int(position.max()) + 1)})
    return table, lengths, pieces


def coco_keys(n: int):
    """"000000000042.jpg"-style keys as a fixed-width bytes array, built without a Python string per image."""
    import numpy as np

    chars = np.empty((n, 16), dtype=np.uint8)
    numbers = np.arange(n, dtype=np.int64)
    for digit in range(12):
        chars[:, 11 - digit] = ord("0") + (numbers // 10 ** digit) % 10
    chars[:, 12:] = np.frombuffer(b".jpg", dtype=np.uint8)
    return chars.view("S16").reshape(n)


def build_index(n: int):
    from vit_t5_dsi.checkpoint.image_index import ImageIndex

    table, lengths, pieces = rq_table(n)
    return ImageIndex.from_token_table(coco_keys(n), table, lengths, scheme="rq", eos_token_id=EOS,
                                       pad_token_id=PAD, id_string_pieces=pieces,
                                       added_tokens=sorted(set(pieces.values())),
                                       scheme_info={"num_levels": LEVELS, "codes_per_level": [CODES] * LEVELS})


def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class PeakRSS:
    """Samples this process's RSS every 5 ms while in the `with` block."""

    def __enter__(self):
        import threading
        import time

        self.start, self.peak, self._done = rss(), rss(), threading.Event()

        def sample():
            while not self._done.is_set():
                self.peak = max(self.peak, rss())
                time.sleep(0.005)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def child_write(n: int, directory: str, baseline_dir: str | None) -> dict:
    import time

    import vit_t5_dsi.checkpoint.image_index  # noqa: F401  (imports are not part of the build time)

    start = time.perf_counter()
    index = build_index(n)
    built = time.perf_counter() - start
    start = time.perf_counter()
    index.save(os.path.join(directory, "columns"), columns=True)
    saved = time.perf_counter() - start
    if baseline_dir:  # the first layout, as the baseline code writes and reads it
        with open(os.path.join(baseline_dir, "image_index.json"), "w", encoding="utf-8") as f:
            json.dump(index.to_dict(), f)
    files = os.path.join(directory, "columns")
    return {"build_s": built, "save_s": saved,
            "file_bytes": sum(os.path.getsize(os.path.join(files, name)) for name in os.listdir(files))}


def child_load(directory: str, traced: bool, package: str) -> dict:
    import gc
    import importlib
    import time

    import numpy as np

    module = importlib.import_module(f"{package}.image_index")
    gc.collect()
    result = {}
    if traced:
        import tracemalloc

        tracemalloc.start()
        index = module.ImageIndex.load(directory)
        gc.collect()
        result["index_bytes"] = tracemalloc.get_traced_memory()[0]
        trie = index.trie
        gc.collect()
        result["constraint_bytes"] = tracemalloc.get_traced_memory()[0] - result["index_bytes"]
        tracemalloc.stop()
        result["index_nbytes"] = getattr(index, "nbytes", None)
        result["trie_nbytes"] = getattr(trie, "nbytes", None)
    else:
        with PeakRSS() as memory:
            start, cpu = time.perf_counter(), time.process_time()
            index = module.ImageIndex.load(directory)
            result["load_s"] = time.perf_counter() - start
            result["load_cpu_s"] = time.process_time() - cpu
        result["load_peak_rss_bytes"] = memory.peak - memory.start
        result["index_rss_bytes"] = rss() - memory.start
        with PeakRSS() as memory:
            start = time.perf_counter()
            trie = index.trie
            result["constraint_s"] = time.perf_counter() - start
        result["constraint_rss_bytes"] = rss() - memory.peak + (memory.peak - memory.start)
        # the index answers: a generated id back to its image, an image to its labels
        position = len(index) // 3
        labels = index.labels_for(index.keys[position])
        result["decode_ok"] = int(index.decode(np.asarray([[PAD] + labels]))[0]) == position
        result["num_images"] = len(index)
        del trie
    return result


def child_build(n: int) -> dict:
    import time

    import vit_t5_dsi.checkpoint.image_index as image_index

    table, lengths, pieces = rq_table(n)
    keys = coco_keys(n)
    with PeakRSS() as memory:
        start = time.perf_counter()
        index = image_index.ImageIndex.from_token_table(keys, table, lengths, scheme="rq", eos_token_id=EOS,
                                                        pad_token_id=PAD, id_string_pieces=pieces)
        trie = index.trie
        seconds = time.perf_counter() - start
    return {"build_s": seconds, "peak_rss_bytes": memory.peak, "peak_extra_bytes": memory.peak - memory.start,
            "input_bytes": table.nbytes + keys.nbytes, "index_nbytes": index.nbytes, "trie_nbytes": trie.nbytes,
            "num_images": n}


def run_child(*args, python_path: str | None = None, timeout: int = 1800) -> dict:
    import time

    print(f"[{time.strftime('%H:%M:%S')}] {args[0]} {args[1:]}", file=sys.stderr, flush=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (python_path, REPO, env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(list(args))],
                            capture_output=True, text=True, env=env, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"child {args[0]} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def baseline_package(rev: str, directory: str) -> str | None:
    """The image index code of `rev`, as a package `baseline_vit_t5_dsi` under `directory` (None outside git)."""
    package = os.path.join(directory, "baseline_vit_t5_dsi")
    os.makedirs(package)
    open(os.path.join(package, "__init__.py"), "w").close()
    listed = subprocess.run(["git", "-C", REPO, "ls-tree", "--name-only", f"{rev}:vit_t5_dsi"], capture_output=True,
                            text=True)
    if listed.returncode != 0:
        return None
    for name in [name for name in listed.stdout.split() if name.endswith(".py") and name != "__init__.py"]:
        shown = subprocess.run(["git", "-C", REPO, "show", f"{rev}:vit_t5_dsi/{name}"], capture_output=True)
        if shown.returncode != 0:
            return None
        with open(os.path.join(package, name), "wb") as f:
            f.write(shown.stdout)
    return directory


# ----- the table --------------------------------------------------------------------------------------------

def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=1_000_000)
    parser.add_argument("--build_images", type=int, default=10_000_000)
    parser.add_argument("--baseline_rev", default="198254f",
                        help="git revision whose code (and JSON layout) is measured as the baseline")
    parser.add_argument("--no_baseline", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes for the timed load (fastest kept)")
    parser.add_argument("--output_json", default="bench_index_memory.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = json.loads(args.child)
        print(json.dumps({"write": child_write, "load": child_load, "build": child_build}[kind](*rest)))
        return

    n = args.num_images
    rows = {}
    with tempfile.TemporaryDirectory() as work:
        baseline_code = None if args.no_baseline else baseline_package(args.baseline_rev, os.path.join(work, "code"))
        baseline_dir = os.path.join(work, "first_layout") if baseline_code else None
        if baseline_dir:
            os.makedirs(baseline_dir)
        written = run_child("write", n, work, baseline_dir)
        columns = os.path.join(work, "columns")
        # the machine may be shared: the fastest of a few fresh processes, with its CPU seconds beside it
        timed = min((run_child("load", columns, False, "vit_t5_dsi") for _ in range(args.repeats)),
                    key=lambda result: result["load_s"])
        traced = run_child("load", columns, True, "vit_t5_dsi")
        rows["now"] = {**written, **timed, **traced}
        if baseline_dir:
            before_timed = run_child("load", baseline_dir, False, "baseline_vit_t5_dsi", python_path=baseline_code)
            before_traced = run_child("load", baseline_dir, True, "baseline_vit_t5_dsi", python_path=baseline_code)
            rows["before"] = {"file_bytes": os.path.getsize(os.path.join(baseline_dir, "image_index.json")),
                              **before_timed, **before_traced}
        built = run_child("build", args.build_images) if args.build_images else None

    now = rows["now"]
    before = rows.get("before")
    per = lambda value, count=n: value / count  # noqa: E731
    lines = [
        ("whole index RAM, B/image (tracemalloc)", per(now["index_bytes"]), before and per(before["index_bytes"]),
         "<= 40", per(now["index_bytes"]) <= 40),
        ("  its arrays (index.nbytes), B/image", per(now["index_nbytes"]), None, "", None),
        ("  RSS growth after load, B/image", per(now["index_rss_bytes"]), before and per(before["index_rss_bytes"]),
         "", None),
        ("constraint RAM, B/image (tracemalloc)", per(now["constraint_bytes"]),
         before and per(before["constraint_bytes"]), "<= 16", per(now["constraint_bytes"]) <= 16),
        ("  its arrays (trie.nbytes), B/image", per(now["trie_nbytes"]), None, "", None),
        ("files on disk, B/image", per(now["file_bytes"]), before and per(before["file_bytes"]), "<= 32",
         per(now["file_bytes"]) <= 32),
        ("load s (fresh process, wall)", now["load_s"], before and before["load_s"], "<= 2", now["load_s"] <= 2),
        ("  load CPU s", now["load_cpu_s"], before and before["load_cpu_s"], "", None),
        ("  load peak RSS growth, MB", now["load_peak_rss_bytes"] / 2 ** 20,
         before and before["load_peak_rss_bytes"] / 2 ** 20, "", None),
        ("constraint build s (after load)", now["constraint_s"], before and before["constraint_s"], "", None),
    ]
    if built:
        lines += [
            (f"{built['num_images'] / 1e6:g}M ids: index + constraint build s", built["build_s"], None, "<= 60",
             built["build_s"] <= 60),
            (f"{built['num_images'] / 1e6:g}M ids: process peak RSS, MB", built["peak_rss_bytes"] / 2 ** 20, None,
             "<= 2048", built["peak_rss_bytes"] <= 2 * 2 ** 30),
            (f"{built['num_images'] / 1e6:g}M ids: peak beyond the inputs, MB", built["peak_extra_bytes"] / 2 ** 20,
             None, "", None),
            (f"{built['num_images'] / 1e6:g}M ids: index + constraint, B/image",
             (built["index_nbytes"] + built["trie_nbytes"]) / built["num_images"], None, "", None),
        ]
    print(f"\nImage index at {n:,} rq ids ({LEVELS} levels x {CODES} codes, 16-byte keys), each figure from a fresh "
          f"process; 'before' = code of {args.baseline_rev} with its JSON layout")
    print(f"{'figure':<46}{'now':>12}{'before':>12}  {'target':<9}verdict")
    for name, value, old, target, ok in lines:
        old_text = f"{old:>12.2f}" if isinstance(old, (int, float)) else f"{'-':>12}"
        print(f"{name:<46}{value:>12.2f}{old_text}  {target:<9}{'' if ok is None else verdict(ok)}")
    print(f"decode after load: {'ok' if now['decode_ok'] else 'WRONG'}; build from table {now['build_s']:.2f} s, "
          f"save {now['save_s']:.2f} s")
    with open(args.output_json, "w", encoding="utf-8") as f:
        json.dump({"num_images": n, "rows": rows, "build": built}, f, indent=2)


if __name__ == "__main__":
    main()
