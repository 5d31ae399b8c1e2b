"""Reading a trained checkpoint for an update, and writing the updated one atomically, with its update log.

A generative checkpoint of the default recipe holds two models whose indexes must change together: the
generative model (ids and trie) and the dual encoder in `dual_encoder/` (the embeddings that re-rank, filter
pseudo-queries and give rq ids to new images). Both are written in one `save_directory_atomically` call: nothing in
the target folder changes until every file of the update is on disk, so a crash before that leaves the old
checkpoint whole and loadable.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
from dataclasses import dataclass, field

from ..checkpoint.checkpoint_io import (DUAL_ENCODER_SUBFOLDER, INDEX_FILE_NAME, PSEUDO_QUERIES_FILE, STAGING_PREFIX,
                                        UPDATES_FILE, atomic_write_text, save_directory_atomically, UsageError)
from ..checkpoint.loading import load_dsi_model
from ..checkpoint.processing_vit_t5_dsi import ViTT5DSIProcessor
from ..training.model_card import updates_section
from ..training.pseudo_queries import PseudoQueries
from ..training.trainer import RESUME_ONLY_FILES

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"


@dataclass
class Checkpoint:
    """What an update reads and rewrites: the model (generative or dual encoder) with its index and processor,
    the paired dual encoder (`dual_encoder/`) when there is one, stored pseudo-queries and the update log."""

    path: str
    model: object
    processor: ViTT5DSIProcessor
    dual_encoder: object | None = None
    dual_processor: ViTT5DSIProcessor | None = None
    pseudo_queries: PseudoQueries | None = None
    updates: list[dict] = field(default_factory=list)
    weights_changed: bool = False

    @property
    def is_dual_encoder(self) -> bool:
        return self.model.config.variant == "dual_encoder"

    @property
    def encoder(self):
        """The dual encoder that embeds images for this checkpoint (itself, or its `dual_encoder/`), or None."""
        return self.model if self.is_dual_encoder else self.dual_encoder

    @property
    def encoder_processor(self):
        return self.processor if self.is_dual_encoder else self.dual_processor


def load_checkpoint(path: str, dual_encoder: str | None = None) -> Checkpoint:
    """A local checkpoint directory (`dual_encoder`: another dual-encoder checkpoint than `path/dual_encoder`)."""
    if not os.path.isfile(os.path.join(path, INDEX_FILE_NAME)):
        raise UsageError(f"{path}: not a trained checkpoint directory (no {INDEX_FILE_NAME}).")
    model = load_dsi_model(path)
    checkpoint = Checkpoint(path, model, ViTT5DSIProcessor.from_pretrained(path))
    dual = dual_encoder or os.path.join(path, DUAL_ENCODER_SUBFOLDER)
    if not checkpoint.is_dual_encoder and os.path.isfile(os.path.join(dual, INDEX_FILE_NAME)):
        checkpoint.dual_encoder = load_dsi_model(dual)
        checkpoint.dual_processor = ViTT5DSIProcessor.from_pretrained(dual)
        if checkpoint.dual_encoder.config.variant != "dual_encoder":
            raise UsageError(f"{dual}: not a dual-encoder checkpoint.")
    elif dual_encoder:
        raise UsageError(f"{dual_encoder}: no dual-encoder checkpoint there ({INDEX_FILE_NAME} missing).")
    stored = os.path.join(path, PSEUDO_QUERIES_FILE)
    if os.path.isfile(stored):
        checkpoint.pseudo_queries = PseudoQueries.load(stored, known_keys=list(model.image_index.keys))
    log = os.path.join(path, UPDATES_FILE)
    if os.path.isfile(log):
        with open(log, encoding="utf-8") as f:
            checkpoint.updates = json.load(f)
    return checkpoint


def check_output_dir(source: str, output_dir: str | None, overwrite_output_dir: bool) -> str:
    """Where the update goes. The checkpoint itself (`output_dir` None or the same folder) only with
    `overwrite_output_dir`; another folder must be new or empty unless `overwrite_output_dir` replaces it."""
    target = output_dir or source
    same = os.path.abspath(target) == os.path.abspath(source)
    if same and not overwrite_output_dir:
        raise UsageError(f"output_dir {target} is the checkpoint being updated: pass overwrite_output_dir=True "
                         "(--overwrite_output_dir) to update it in place (the old one stays loadable until the new "
                         "one is complete), or another output_dir.")
    if not same and os.path.isdir(target) and os.listdir(target) and not overwrite_output_dir:
        raise UsageError(f"output_dir {target} is not empty; pass overwrite_output_dir=True "
                         "(--overwrite_output_dir) to replace it, or another output_dir.")
    if not same and os.path.abspath(source).startswith(os.path.abspath(target) + os.sep):
        raise UsageError(f"output_dir {target} holds the checkpoint being updated; choose another folder.")
    return target


def _copy_checkpoint(source: str, folder: str) -> None:
    """The model files of `source` (not its resume state, intermediate checkpoints or a killed save's leftovers)."""
    def ignore(directory, names):
        return [n for n in names if n in RESUME_ONLY_FILES or n.startswith(("checkpoint-", STAGING_PREFIX,
                                                                            "rng_state"))]

    for name in os.listdir(source):
        if name in ignore(source, [name]):
            continue
        path = os.path.join(source, name)
        if os.path.isdir(path):
            shutil.copytree(path, os.path.join(folder, name), ignore=ignore, dirs_exist_ok=True)
        else:
            shutil.copy2(path, os.path.join(folder, name))


def write_checkpoint(checkpoint: Checkpoint, target: str, record: dict) -> str:
    """Write the updated checkpoint to `target` atomically, with `record` appended to its update log and card."""
    same = os.path.abspath(target) == os.path.abspath(checkpoint.path)
    if not same and os.path.isdir(target):
        shutil.rmtree(target)  # overwrite_output_dir: the folder's earlier content is replaced, not merged
    record = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **record}
    updates = checkpoint.updates + [record]
    card_path = os.path.join(checkpoint.path, CARD_FILE)
    card = open(card_path, encoding="utf-8").read() if os.path.isfile(card_path) else ""

    def write(folder: str) -> None:
        if not same:
            _copy_checkpoint(checkpoint.path, folder)
        model = checkpoint.model
        if checkpoint.weights_changed or not same:
            model.save_pretrained(folder)
        else:
            model.image_index.save(folder)
        checkpoint.processor.save_pretrained(folder)
        if checkpoint.dual_encoder is not None and not checkpoint.is_dual_encoder:
            dual_folder = os.path.join(folder, DUAL_ENCODER_SUBFOLDER)
            os.makedirs(dual_folder, exist_ok=True)
            checkpoint.dual_encoder.image_index.save(dual_folder)
        if checkpoint.pseudo_queries is not None:
            path = os.path.join(folder, PSEUDO_QUERIES_FILE)
            if len(checkpoint.pseudo_queries):
                checkpoint.pseudo_queries.save(path)
            elif os.path.exists(path):
                os.unlink(path)
        atomic_write_text(os.path.join(folder, UPDATES_FILE), json.dumps(updates, indent=1))
        atomic_write_text(os.path.join(folder, CARD_FILE), updates_section(card, updates))

    save_directory_atomically(target, write)
    checkpoint.updates, checkpoint.path = updates, target
    logger.info("Updated checkpoint written to %s (%d images indexed).", target, len(checkpoint.model.image_index))
    return target


__all__ = ["Checkpoint", "load_checkpoint", "check_output_dir", "write_checkpoint", "UPDATES_FILE"]
