"""Procedurally drawn scenes of 1-3 objects, each with differently worded captions: the built-in collection.

Every image's attribute set (shape, colour, size, grid cell of each object) is unique, so each image has
exactly one correct answer, and captions describe everything that is drawn, so retrieval of unseen images
is learnable. Written as PNGs plus a Karpathy-layout JSON so the same loader serves it and Flickr30K.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (240, 220, 30),
           "purple": (140, 40, 180), "orange": (250, 140, 20), "white": (250, 250, 250), "black": (15, 15, 15)}
SIZES = ("small", "large")
ROWS, COLUMNS = ("top", "middle", "bottom"), ("left", "center", "right")
BACKGROUND = (128, 128, 128)


def cell_name(cell: int, style: int) -> str:
    row, column = ROWS[cell // 3], COLUMNS[cell % 3]
    if cell == 4:
        return ("center", "middle", "centre")[style % 3]
    if style % 2 and row == "middle":
        return f"{column} side"
    return f"{row} {column}" if style % 3 != 2 else f"{row}-{column}"


def describe(objects, style: int, rng: np.random.Generator) -> str:
    """One caption; `style` picks the wording, `rng` the order in which objects are mentioned."""
    order = rng.permutation(len(objects))
    phrases = []
    for i in order:
        shape, colour, size, cell = objects[i]
        where = cell_name(cell, style)
        if style == 0:
            phrases.append(f"a {SIZES[size]} {colour} {SHAPES[shape]} in the {where}")
        elif style == 1:
            big = "big" if size else "little"
            phrases.append(f"a {colour} {SHAPES[shape]}, {big}, at the {where}")
        else:
            phrases.append(f"{where}: {SIZES[size]} {colour} {SHAPES[shape]}")
    if style == 0:
        return " and ".join(phrases)
    if style == 1:
        return "there is " + " and ".join(phrases) + " on a gray background"
    return "; ".join(phrases)


def draw_scene(objects, image_size: int) -> Image.Image:
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell_px = image_size / 3
    for shape, colour, size, cell in objects:
        cx, cy = (cell % 3 + 0.5) * cell_px, (cell // 3 + 0.5) * cell_px
        r = cell_px * (0.42 if size else 0.22)
        fill = COLOURS[colour]
        if SHAPES[shape] == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif SHAPES[shape] == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif SHAPES[shape] == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    return image


def sample_scenes(num_images: int, seed: int = 0, max_objects: int = 3) -> list[tuple]:
    """Distinct attribute sets, deterministic in `seed`. Objects sit in distinct grid cells."""
    if not 1 <= max_objects <= 3:
        raise ValueError(f"max_objects must be 1-3, got {max_objects}.")
    capacity = {1: 576, 2: 36 * 64 ** 2 + 576}.get(max_objects, 10 ** 9)
    if not 1 <= num_images <= min(capacity, 10 ** 6):
        raise ValueError(f"num_images must be between 1 and {min(capacity, 10 ** 6)} with max_objects="
                         f"{max_objects}, got {num_images}.")
    rng = np.random.default_rng(seed)
    colours = list(COLOURS)
    seen, scenes = set(), []
    weights = np.array([1.0, 2.0, 2.0][:max_objects])
    while len(scenes) < num_images:
        count = int(rng.choice(max_objects, p=weights / weights.sum())) + 1
        cells = rng.choice(9, size=count, replace=False)
        scene = tuple(sorted((int(rng.integers(len(SHAPES))), colours[int(rng.integers(len(colours)))],
                              int(rng.integers(2)), int(cell)) for cell in cells))
        if scene not in seen:
            seen.add(scene)
            scenes.append(scene)
    return scenes


def generate_scenes(output_dir: str, num_images: int = 1000, image_size: int = 64, seed: int = 0,
                    max_objects: int = 3, captions_per_image: int = 3, heldout_fraction: float = 0.1,
                    progress: bool = True) -> str:
    """Write `images/*.png` and `dataset_synthetic.json` (Karpathy layout); returns the JSON path.

    `heldout_fraction` of the images get split "test" and as many "val" (the rest "train").
    """
    if captions_per_image < 3:
        raise ValueError("captions_per_image must be >= 3 (three wordings per image).")
    image_dir = os.path.join(output_dir, "images")
    os.makedirs(image_dir, exist_ok=True)
    rng = np.random.default_rng(seed + 1)
    scenes = sample_scenes(num_images, seed, max_objects)
    num_heldout = int(round(num_images * heldout_fraction))
    splits = np.array(["train"] * num_images, dtype=object)
    order = rng.permutation(num_images)
    splits[order[:num_heldout]] = "test"
    splits[order[num_heldout:2 * num_heldout]] = "val"
    entries = []
    for i, scene in enumerate(tqdm(scenes, desc="Drawing scenes", disable=not progress, mininterval=1.0)):
        filename = f"scene_{i:06d}.png"
        draw_scene(scene, image_size).save(os.path.join(image_dir, filename), compress_level=1)
        sentences = [describe(scene, style % 3, rng) for style in range(captions_per_image)]
        entries.append({"filename": filename, "imgid": i, "split": str(splits[i]),
                        "sentences": [{"raw": s, "tokens": s.split()} for s in sentences]})
    path = os.path.join(output_dir, "dataset_synthetic.json")
    handle, tmp = tempfile.mkstemp(dir=output_dir, suffix=".tmp")
    with os.fdopen(handle, "w") as f:  # dumps (C encoder) then one write: json.dump streams in pure Python
        f.write(json.dumps({"dataset": "synthetic_scenes", "seed": seed, "images": entries}))
    os.replace(tmp, path)
    return path


__all__ = ["generate_scenes", "sample_scenes", "draw_scene", "describe"]
