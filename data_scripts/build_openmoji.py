#!/usr/bin/env python
"""Build the OpenMoji collection (PNGs + a Karpathy-layout JSON) for run_dsi_image.py, offline and reproducibly.

    npm pack openmoji@17.0.0                 # -> openmoji-17.0.0.tgz (or use a checkout of the OpenMoji repository)
    python data_scripts/build_openmoji.py openmoji-17.0.0.tgz --output_dir /tmp/openmoji
    accelerate launch run_dsi_image.py --karpathy_json /tmp/openmoji/dataset_openmoji.json \
        --image_dir /tmp/openmoji/images ...

SOURCE is the npm tarball, its extracted folder (`package/` or the folder above it) or a repository checkout: the
colour SVGs are read from `color/svg/HEXCODE.svg`, the annotations and tags from `data/openmoji.csv`. Every emoji
becomes `images/HEXCODE.png` (flattened on white, RGB) with several captions built from its annotation, tags and
group/subgroup; each caption keeps the whole annotation, so skin-tone and gender variants differ by their words.
About --heldout_fraction of the images (chosen by a hash of the hexcode, so the choice does not depend on the
order or the number of emoji) get split "test" or "val"; the rest "train". Emoji whose SVG is missing or does not
render are skipped and counted. `ATTRIBUTION.txt` (the credit CC BY-SA 4.0 asks for) is written beside the
images, and `dataset_openmoji.json` last, atomically.

OpenMoji: all emojis designed by OpenMoji - the open-source emoji and icon project. License: CC BY-SA 4.0.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import multiprocessing
import os
import random
import re
import sys
import tarfile
import zlib

from tqdm.auto import tqdm

from vit_t5_dsi.checkpoint.checkpoint_io import atomic_write_text

logger = logging.getLogger("build_openmoji")

CSV_PATH = "data/openmoji.csv"
SVG_DIR = "color/svg"
JSON_NAME = "dataset_openmoji.json"
ATTRIBUTION_NAME = "ATTRIBUTION.txt"
CREDIT = ("All emojis designed by OpenMoji \u2013 the open-source emoji and icon project. License: CC BY-SA 4.0")
ATTRIBUTION = f"""{CREDIT}

https://openmoji.org/  -  https://github.com/hfg-gmuend/openmoji
License: Creative Commons Attribution-ShareAlike 4.0 International (CC BY-SA 4.0),
https://creativecommons.org/licenses/by-sa/4.0/

This folder was made from OpenMoji {{version}} by data_scripts/build_openmoji.py (vit-t5-dsi): the colour SVGs were
rendered to {{size}}x{{size}} PNG on a white background, and captions were written from the annotations, tags and
groups in data/openmoji.csv. These images and captions are an adaptation of OpenMoji and are shared under the same
licence, CC BY-SA 4.0; credit OpenMoji as above wherever you use or show them.
"""
GROUP_NAMES = {
    "smileys-emotion": "smileys and emotion", "people-body": "people and body", "animals-nature": "animals and nature",
    "food-drink": "food and drink", "travel-places": "travel and places", "extras-openmoji": "OpenMoji extras",
    "extras-unicode": "Unicode extras",
}
MAX_TAGS = 5


class SourceError(Exception):
    """SOURCE is not an OpenMoji package, extracted package or checkout; the message names the path."""


# ----------------------------------------------------------------------------------------------------- the source

class _Source:
    """The CSV text, the version, and `svg(hexcode) -> bytes | None`, from a tarball or a folder."""

    def __init__(self, path: str):
        self.path = path
        self.version = "unknown"
        if os.path.isdir(path):
            self._init_folder(path)
        elif os.path.isfile(path):
            self._init_tarball(path)
        else:
            raise SourceError(f"{path}: no such file or folder (expected the openmoji npm tarball, its extracted "
                              "folder, or a checkout of the OpenMoji repository).")

    def _init_folder(self, path):
        for root in (path, os.path.join(path, "package")):
            if os.path.isfile(os.path.join(root, CSV_PATH)):
                break
        else:
            raise SourceError(f"{path}: no {CSV_PATH} here or in package/; is this an OpenMoji package or checkout?")
        if not os.path.isdir(os.path.join(root, SVG_DIR)):
            raise SourceError(f"{path}: no {SVG_DIR}/ folder beside {CSV_PATH}; is this an OpenMoji package?")
        self.root = root
        self.csv_text = _read_text(os.path.join(root, CSV_PATH))
        self._svgs = None
        self.version = _version(os.path.join(root, "package.json"), None) or self.version

    def _init_tarball(self, path):
        try:
            with tarfile.open(path, "r:*") as tar:
                members = [m for m in tar.getmembers() if m.isfile()]
                csv_members = [m for m in members if m.name == CSV_PATH or m.name.endswith("/" + CSV_PATH)]
                if not csv_members:
                    raise SourceError(f"{path}: the archive has no {CSV_PATH}; is this the openmoji npm tarball?")
                prefix = min((m.name for m in csv_members), key=len)[: -len(CSV_PATH)]
                svg_prefix = prefix + SVG_DIR + "/"
                self._svgs = {}
                for member in members:
                    if member.name.startswith(svg_prefix) and member.name.endswith(".svg"):
                        name = member.name[len(svg_prefix):]
                        if "/" not in name:
                            self._svgs[name[: -len(".svg")]] = tar.extractfile(member).read()
                    elif member.name == prefix + CSV_PATH:
                        self.csv_text = tar.extractfile(member).read().decode("utf-8", errors="replace")
                    elif member.name == prefix + "package.json":
                        self.version = _version(None, tar.extractfile(member).read()) or self.version
        except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
            first_line = (str(err).splitlines() or [type(err).__name__])[0].rstrip(":")
            raise SourceError(f"{path}: not a folder nor a readable .tgz/.tar archive ({first_line}).") from err
        if not self._svgs:
            raise SourceError(f"{path}: the archive has no {SVG_DIR}/*.svg; is this the openmoji npm tarball?")

    def svg(self, hexcode: str) -> bytes | None:
        if self._svgs is not None:
            return self._svgs.get(hexcode)
        try:
            with open(os.path.join(self.root, SVG_DIR, hexcode + ".svg"), "rb") as f:
                return f.read()
        except OSError:
            return None


def _read_text(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def _version(path, data):
    try:
        if data is None:
            with open(path, "rb") as f:
                data = f.read()
        version = json.loads(data).get("version")
        return str(version) if version else None
    except (OSError, ValueError, AttributeError):
        return None


def read_rows(source: _Source) -> list[dict]:
    reader = csv.DictReader(io.StringIO(source.csv_text))
    missing = {"hexcode", "annotation", "group", "subgroups"} - set(reader.fieldnames or ())
    if missing:
        raise SourceError(f"{source.path}: {CSV_PATH} lacks column(s) {sorted(missing)}.")
    rows, seen = [], set()
    for row in reader:
        hexcode = (row.get("hexcode") or "").strip()
        if not hexcode or not (row.get("annotation") or "").strip() or hexcode in seen:
            continue
        seen.add(hexcode)
        rows.append(row)
    if not rows:
        raise SourceError(f"{source.path}: {CSV_PATH} has no emoji rows.")
    return rows


# ------------------------------------------------------------------------------------------------------- captions

def _words(slug: str) -> str:
    return GROUP_NAMES.get(slug, slug.replace("-", " ").strip())


def _tags(row: dict, by_hexcode: dict) -> list[str]:
    """The row's tags and OpenMoji tags (a skin-tone variant without any borrows its base emoji's), deduplicated."""
    def split(r):
        text = f"{r.get('tags') or ''},{r.get('openmoji_tags') or ''}"
        return [t.strip() for t in text.split(",") if t.strip() and "\ufffd" not in t]

    tags = split(row)
    base = by_hexcode.get((row.get("skintone_base_hexcode") or "").strip())
    if not tags and base is not None:
        tags = split(base)
    seen, unique = set(), []
    for tag in tags:
        if tag.lower() not in seen:
            seen.add(tag.lower())
            unique.append(tag)
    return unique


def captions_for(row: dict, by_hexcode: dict) -> list[str]:
    """Three differently worded captions; each holds every word of the annotation (name and qualifiers such as
    'medium-dark skin tone' or 'woman'), so variants of one emoji are told apart by their captions."""
    annotation = " ".join(row["annotation"].split())
    name, _, qualifiers = annotation.partition(":")
    name, qualifiers = name.strip(), qualifiers.strip()
    full = f"{name}, {qualifiers}" if qualifiers else name
    group, subgroup = _words(row.get("group") or ""), _words(row.get("subgroups") or "")
    kind = f"{subgroup} emoji" if subgroup else "emoji"
    where = f" from {group}" if group else ""
    captions = [annotation, f"{name} ({qualifiers}), {kind}{where}" if qualifiers else f"{name}, {kind}{where}"]
    tags = _tags(row, by_hexcode)
    if tags:
        rng = random.Random(zlib.crc32(row["hexcode"].encode("utf-8")))
        chosen = sorted(rng.sample(range(len(tags)), min(MAX_TAGS, len(tags))))
        captions.append(f"{full}: {', '.join(tags[i] for i in chosen)}")
    elif subgroup:
        captions.append(f"{subgroup}: {full}")
    unique = []
    for caption in captions:
        if caption and caption not in unique:
            unique.append(caption)
    return unique


def split_for(hexcode: str, heldout_fraction: float) -> str:
    """'test' or 'val' for about heldout_fraction of the hexcodes (half each), 'train' otherwise; by hash, so one
    emoji keeps its split whatever else the collection holds."""
    u = int.from_bytes(hashlib.sha256(hexcode.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64
    if u < heldout_fraction / 2:
        return "test"
    if u < heldout_fraction:
        return "val"
    return "train"


def _tokens(caption: str) -> list[str]:
    return re.findall(r"\w+", caption.lower())


# ------------------------------------------------------------------------------------------------------ rendering

def render_png(svg: bytes, size: int) -> bytes:
    """The SVG at size x size, flattened on white, as RGB PNG bytes."""
    import cairosvg
    from PIL import Image

    png = cairosvg.svg2png(bytestring=svg, output_width=size, output_height=size)
    with Image.open(io.BytesIO(png)) as image:
        image = image.convert("RGBA")
        if image.size != (size, size):
            image = image.resize((size, size), Image.LANCZOS)
        flat = Image.new("RGB", image.size, (255, 255, 255))
        flat.paste(image, mask=image.getchannel("A"))
    out = io.BytesIO()
    flat.save(out, format="PNG", optimize=False)
    return out.getvalue()


def _render_task(task):
    """Worker: render one SVG and write it (temp file + rename). Returns (index, error or None)."""
    index, svg, path, size = task
    try:
        data = render_png(svg, size)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return index, None
    except Exception as err:  # noqa: BLE001 -- any failure to render skips this emoji
        return index, f"{type(err).__name__}: {err}"


# ---------------------------------------------------------------------------------------------------------- build

def build(source_path: str, output_dir: str, image_size: int = 72, heldout_fraction: float = 0.1,
          num_workers: int = 2, progress: bool = True) -> str:
    """Build the collection under output_dir; returns the JSON's path. Raises SourceError on a bad SOURCE."""
    if image_size < 8:
        raise ValueError(f"--image_size {image_size}: use at least 8 pixels.")
    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"--heldout_fraction {heldout_fraction}: use a value in [0, 1).")
    try:
        import cairosvg  # noqa: F401
    except (ImportError, OSError) as err:  # OSError: cairocffi finds no system cairo library
        raise ImportError(f"build_openmoji needs cairosvg ({err}): pip install -e \".[openmoji]\"") from err
    source = _Source(source_path)
    rows = read_rows(source)
    by_hexcode = {row["hexcode"].strip(): row for row in rows}
    image_dir = os.path.join(output_dir, "images")
    os.makedirs(image_dir, exist_ok=True)

    tasks, missing = [], []
    for index, row in enumerate(rows):
        svg = source.svg(row["hexcode"].strip())
        if svg is None:
            missing.append(row["hexcode"])
            continue
        tasks.append((index, svg, os.path.join(image_dir, row["hexcode"].strip() + ".png"), image_size))
    failed = {}
    bar = tqdm(total=len(tasks), desc="rendering OpenMoji", unit="svg", disable=not progress)
    if num_workers > 1 and len(tasks) > 1:
        with multiprocessing.get_context().Pool(num_workers) as pool:
            for index, error in pool.imap_unordered(_render_task, tasks, chunksize=16):
                if error:
                    failed[index] = error
                bar.update()
    else:
        for task in tasks:
            index, error = _render_task(task)
            if error:
                failed[index] = error
            bar.update()
    bar.close()
    if missing:
        logger.warning("skipped %d emoji whose SVG is missing from %s/ (e.g. %s)", len(missing), SVG_DIR,
                       ", ".join(missing[:5]))
    if failed:
        examples = "; ".join(f"{rows[i]['hexcode']}: {failed[i]}" for i in sorted(failed)[:3])
        logger.warning("skipped %d emoji whose SVG failed to render (e.g. %s)", len(failed), examples)

    rendered = {task[0] for task in tasks} - set(failed)
    images, sentence_id = [], 0
    for index, row in enumerate(rows):
        if index not in rendered:
            continue
        hexcode = row["hexcode"].strip()
        image_id = len(images)
        sentences = []
        for caption in captions_for(row, by_hexcode):
            sentences.append({"raw": caption, "tokens": _tokens(caption), "imgid": image_id, "sentid": sentence_id})
            sentence_id += 1
        images.append({
            "filename": f"{hexcode}.png", "imgid": image_id, "split": split_for(hexcode, heldout_fraction),
            "sentences": sentences, "sentids": [s["sentid"] for s in sentences],
            "hexcode": hexcode, "emoji": row.get("emoji", ""), "group": row.get("group", ""),
            "subgroup": row.get("subgroups", ""),
        })
    if not images:
        raise SourceError(f"{source_path}: no emoji could be rendered.")
    version = source.version
    atomic_write_text(os.path.join(output_dir, ATTRIBUTION_NAME),
                      ATTRIBUTION.format(version=version, size=image_size))
    data = {"dataset": "openmoji", "source": f"OpenMoji {version}", "license": "CC BY-SA 4.0", "credit": CREDIT,
            "image_size": image_size, "images": images}
    json_path = atomic_write_text(os.path.join(output_dir, JSON_NAME),
                                  json.dumps(data, ensure_ascii=False, indent=None, separators=(",", ":")) + "\n")
    counts = {}
    for image in images:
        counts[image["split"]] = counts.get(image["split"], 0) + 1
    logger.info("%d images (%s), %d captions, from OpenMoji %s; %d skipped (missing SVG %d, render failed %d)",
                len(images), ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), sentence_id, version,
                len(missing) + len(failed), len(missing), len(failed))
    return json_path


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s - %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", metavar="SOURCE",
                        help="openmoji-17.0.0.tgz (npm pack openmoji@17.0.0), its extracted folder, or a checkout.")
    parser.add_argument("--output_dir", required=True, help=f"Where images/, {JSON_NAME} and {ATTRIBUTION_NAME} go.")
    parser.add_argument("--image_size", type=int, default=72, help="Square PNG size in pixels (OpenMoji's grid: 72).")
    parser.add_argument("--heldout_fraction", type=float, default=0.1,
                        help="Share of images in splits 'test' and 'val' (half each), chosen by hexcode hash.")
    parser.add_argument("--num_workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="Rendering processes.")
    args = parser.parse_args(argv)
    try:
        path = build(args.source, args.output_dir, args.image_size, args.heldout_fraction, args.num_workers)
    except (SourceError, ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
