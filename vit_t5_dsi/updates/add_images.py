"""`add_images`: new images in a trained checkpoint, findable at once, without retraining.

Each new image gets an id no image ever had (rq: its dual-encoder embedding quantized with the checkpoint's frozen
codebooks, with a collision suffix where the code is taken), the trie takes it, the dual encoder's index gets its
embedding, and, with `update_steps > 0`, a short update teaches the model the new ids (`short_update`).
"""

from __future__ import annotations

import json
import logging
import time

import datasets
import torch

from ..checkpoint.checkpoint_io import UsageError
from ..data.rows import ImageSource
from ..identifiers.new_ids import ids_for_new_images
from ..training.image_embeddings import embed_images
from .checkpoint_update import check_output_dir, load_checkpoint, write_checkpoint
from .new_images import NewImages, load_new_images
from .short_update import index_hits, short_update

logger = logging.getLogger(__name__)

MAX_OLD_IMAGES_CHECKED = 100  # index Hits@1 of old images after an update, on at most this many


def read_replay_captions(replay, indexed, new_keys) -> dict[str, list[str]]:
    """The old collection's training captions to replay: {key: [captions]} or a JSONL of {"image_id", "caption"}
    rows (run_dsi_image.py's --train_file layout). Every key must be indexed and none may be a new image: a new
    image's real captions are evaluation queries only."""
    if replay is None:
        return {}
    if isinstance(replay, dict):
        pairs = [(str(k), c) for k, texts in replay.items() for c in ([texts] if isinstance(texts, str) else texts)]
        source = "replay_captions"
    else:
        pairs, source = [], str(replay)
        try:
            with open(replay, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if line.strip():
                        row = json.loads(line)
                        if not isinstance(row, dict) or "image_id" not in row or not isinstance(row.get("caption"),
                                                                                                str):
                            raise UsageError(f"{replay}:{number}: expected an {{image_id, caption}} row.")
                        pairs.append((str(row["image_id"]), row["caption"]))
        except FileNotFoundError as err:
            raise UsageError(f"{replay}: no such replay captions file.") from err
        except json.JSONDecodeError as err:
            raise UsageError(f"{replay}: not JSONL ({err}).") from err
    new = set(new_keys)
    leaked = sorted({k for k, _ in pairs if k in new})
    if leaked:
        raise UsageError(f"{source}: captions of images being added ({leaked[:3]}): a new image's real captions are "
                         "evaluation queries only and never train.")
    unknown = sorted({k for k, _ in pairs} - set(indexed))
    if unknown:
        raise UsageError(f"{source}: captions of images the checkpoint does not index (e.g. {unknown[:3]}).")
    replay_by_key: dict[str, list[str]] = {}
    for key, caption in pairs:
        if caption.strip():
            replay_by_key.setdefault(key, []).append(" ".join(caption.split()))
    return replay_by_key


def update_images(index, new: NewImages) -> ImageSource:
    """Old images whose files are still there, and the new ones, as the collator and embedder read them."""
    old = [(index.keys[p], index.image_path(p)) for p in range(len(index))]
    old = [(k, {"bytes": None, "path": path}) for k, path in old if path is not None]
    values = [v if isinstance(v, dict) else {"bytes": None, "path": v} for v in new.values]
    return ImageSource(datasets.Dataset.from_dict({"image_key": [k for k, _ in old] + new.keys,
                                                   "image": [v for _, v in old] + values}))


def add_images(checkpoint: str, images, *, output_dir: str | None = None, overwrite_output_dir: bool = False,
               update_steps: int = 0, replay_captions=None, image_dir: str | None = None,
               dual_encoder: str | None = None, learning_rate: float = 5e-4, replay_ratio: float = 2.0,
               batch_size: int = 64, seed: int = 42, evaluate: bool = True,
               device: str | torch.device | None = None, **update_options) -> dict:
    """Add `images` (see `load_new_images`: paths, a folder, a Karpathy/JSONL/parquet collection, or PIL images with
    keys) to the checkpoint in `checkpoint` and write the result to `output_dir` (in place only with
    `overwrite_output_dir=True`), atomically. `update_steps` > 0 runs the short update; `replay_captions` (the
    old collection's training captions, {key: [captions]} or a JSONL file) are replayed in it; `update_options`
    reach `short_update` (num_pseudo_queries, pseudo_query_filter_top_k, lr_scheduler_type). Returns what the
    checkpoint's update log records. A key already indexed is an error naming it."""
    start = time.perf_counter()
    target = check_output_dir(checkpoint, output_dir, overwrite_output_dir)
    if update_steps < 0:
        raise UsageError(f"update_steps must be >= 0, got {update_steps}.")
    ck = load_checkpoint(checkpoint, dual_encoder)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, index = ck.model.to(device), ck.model.image_index
    new = load_new_images(images, image_dir)
    already = [k for k, p in zip(new.keys, index.positions_of(new.keys)) if p >= 0]
    if already:
        raise UsageError(f"{len(already)} of the images to add are already indexed in {checkpoint} (e.g. keys "
                         f"{already[:3]}); remove them first to replace them.")
    replay = read_replay_captions(replay_captions, index.keys, new.keys)
    images_source = update_images(index, new)

    embeddings = None
    if ck.encoder is not None:
        ck.encoder.to(device)
        embeddings = embed_images(ck.encoder, new.keys, images_source, ck.encoder_processor, batch_size, device,
                                  distributed=False)
    elif index.scheme == "rq":
        raise UsageError(f"{checkpoint}: rq ids need the dual encoder they were cut from ({checkpoint}/dual_encoder "
                         "is missing; pass dual_encoder= / --dual_encoder).")
    strings, rows, added = ids_for_new_images(index, ck.processor.tokenizer, len(new),
                                              embeddings.numpy() if embeddings is not None else None)
    model.image_index = index.extended(new.keys, strings, rows, embeddings if index.embeddings is not None else None,
                                       new.paths, added)
    if added:  # position tokens (rq) or atomic ids: the vocabulary grows
        model.image_index.resize_model_embeddings(model)
        ck.weights_changed = True
    if ck.dual_encoder is not None and not ck.is_dual_encoder:
        dual_index = ck.dual_encoder.image_index
        dual_strings, dual_rows, _ = ids_for_new_images(dual_index, ck.dual_processor.tokenizer, len(new))
        ck.dual_encoder.image_index = dual_index.extended(new.keys, dual_strings, dual_rows, embeddings, new.paths)
    levels = int(index.scheme_info.get("num_levels", 0)) if index.scheme == "rq" else 0
    record = {"action": "add", "num_images": len(new), "keys": new.keys[:5], "num_indexed": len(model.image_index),
              "scheme": index.scheme, "tokens_added": len(added), "update_steps": update_steps,
              "ids_with_collision_suffix": sum(len(r) > levels for r in rows) if levels else 0}
    logger.info("Added %d images (%s ids; %d with a collision suffix); index: %d images.", len(new), index.scheme,
                record["ids_with_collision_suffix"], len(model.image_index))
    if update_steps:
        if ck.is_dual_encoder:
            raise UsageError("update_steps: the dual encoder needs no update; its new images are embedded.")
        record.update(short_update(ck, new.keys, images_source, update_steps, replay, learning_rate, batch_size,
                                   replay_ratio, seed, **update_options))
    record["seconds"] = round(time.perf_counter() - start, 1)  # adding, short update included; not the checks below
    if evaluate and not ck.is_dual_encoder:
        old = [k for k in images_source.position if k not in set(new.keys)]
        old = old[:: max(1, len(old) // MAX_OLD_IMAGES_CHECKED)][:MAX_OLD_IMAGES_CHECKED]
        record["figures"] = {**index_hits(ck, new.keys, images_source, "new_index"),
                             **index_hits(ck, old, images_source, "old_index")}
    write_checkpoint(ck, target, record)
    return record


__all__ = ["add_images", "read_replay_captions"]
