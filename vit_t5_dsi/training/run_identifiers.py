"""Which identifiers a run trains on: the checkpoint's own (resumed or continued), or new ones built for this
collection, from the embeddings of a dual encoder (the dense stage's, or --semantic_embeddings) or of the model's
own image tower."""

from __future__ import annotations

import logging

import numpy as np

from ..checkpoint.checkpoint_io import UsageError
from ..checkpoint.image_index import EMBEDDING_SCHEMES, ImageIndex
from ..checkpoint.loading import load_dsi_model
from ..checkpoint.processing_vit_t5_dsi import ViTT5DSIProcessor
from ..identifiers.build import build_image_index, initialise_code_embeddings
from .distributed import broadcast_from_main, check_identical_on_every_process
from .image_embeddings import embed_images
from .recipe import rq_codes_per_level

logger = logging.getLogger("run_dsi_image")


def id_embeddings(model_args, training_args, model, processor, keys, images, dense_dir: str | None) -> np.ndarray:
    """What semantic and rq ids are built from: a .npy, a trained dual encoder (--semantic_embeddings, or the one
    the dense stage trained in `dense_dir`), or the model's own image tower. A dual encoder's saved index
    embeddings are used as they are when they cover the collection; otherwise images are embedded on the
    accelerator, each process its share (call on every process)."""
    source = dense_dir or model_args.semantic_embeddings
    flag = "--dense_first" if dense_dir else f"--semantic_embeddings {source}"
    if source is not None and source.endswith(".npy"):
        embeddings = np.load(source)
        if embeddings.ndim != 2 or len(embeddings) != len(keys):
            raise UsageError(f"{flag}: shape {embeddings.shape} for {len(keys)} indexed images (expected one row "
                             "per image, in index order).")
        return embeddings
    encoder, encoder_processor = model, processor
    if source is not None:
        encoder = load_dsi_model(source)
        if not encoder.config.is_dual_encoder:
            raise UsageError(f"{flag}: expected a .npy file or a dual_encoder checkpoint.")
        try:
            embeddings = encoder.image_index.embeddings_for(keys).float().numpy()
            logger.info("Id embeddings: the image embeddings saved with %s.", source)
            return embeddings
        except (AttributeError, ValueError):  # no saved index or embeddings, or not for all of these images
            pass
        encoder_processor = ViTT5DSIProcessor.from_pretrained(source)  # its own image size and normalisation
    encoder.to(training_args.device)
    return embed_images(encoder, keys, images, encoder_processor, training_args.per_device_eval_batch_size,
                        training_args.device, desc="Embedding images for the ids"
                        if training_args.should_log and not training_args.disable_tqdm else None).numpy()


def coverage_problem(index: ImageIndex | None, keys: list[str]) -> str | None:
    """Why `index` cannot serve a collection of `keys`, or None when it indexes exactly these images."""
    if index is None:
        return "it has no image index"
    indexed, wanted = set(index.keys), set(keys)
    if indexed == wanted:
        return None
    missing, extra = sorted(wanted - indexed), sorted(indexed - wanted)
    return (f"its image index holds {len(indexed)} images, this collection {len(wanted)} ({len(missing)} not in the "
            f"index, e.g. {missing[:3]}; {len(extra)} in the index only, e.g. {extra[:3]})")


def identifiers_for(model_args, training_args, model, processor, splits, images,
                    dense_dir: str | None = None) -> ImageIndex:
    """The checkpoint's index when it covers the collection exactly; new ids only on request (--reindex) or for a
    new model. New ids are built on the main process and sent to the others."""
    keys = splits.index["image_key"][:]
    resume_dir = training_args.resume_from_checkpoint
    if resume_dir is not None:
        index = ImageIndex.from_pretrained(resume_dir)
        problem = coverage_problem(index, keys)
        if problem:
            raise UsageError(f"--resume_from_checkpoint {resume_dir}: {problem}. Resume with the data it was "
                             "trained on.")
        return index
    if model_args.model_name_or_path and not model_args.reindex:
        index = model.image_index
        problem = coverage_problem(index, keys)
        if problem:
            raise UsageError(f"--model_name_or_path {model_args.model_name_or_path}: {problem}. Pass --reindex to "
                             "build new identifiers for this collection (the model then has to learn them).")
        logger.info("Reusing the image index of %s (%s ids).", model_args.model_name_or_path, index.scheme)
        return index
    scheme = "naive" if model.config.is_dual_encoder else model_args.docid_scheme
    embeddings = None
    if scheme in EMBEDDING_SCHEMES:
        embeddings = id_embeddings(model_args, training_args, model, processor, keys, images, dense_dir)
    payload = None
    if training_args.process_index == 0:
        index = build_image_index(keys, processor.tokenizer, scheme, embeddings=embeddings,
                                  num_clusters=model_args.semantic_num_clusters,
                                  max_leaf_size=model_args.semantic_max_leaf_size, seed=training_args.seed,
                                  rq_num_levels=model_args.rq_num_levels,
                                  rq_codes_per_level=rq_codes_per_level(model_args, len(keys)))
        logger.info("Built %s ids for %d images (at most %d tokens)%s.", scheme, len(index), index.max_id_length,
                    f": {index.scheme_info}" if index.scheme_info else "")
        payload = {"index": index.to_dict(),
                   "code_vectors": {token: vector.tolist() for token, vector in index.code_vectors.items()},
                   "codebooks": [c.tolist() for c in index.codebooks or []]}  # saved: images added later use them
    payload = broadcast_from_main(payload)
    index = ImageIndex.from_dict(payload["index"])
    index.codebooks = [np.asarray(c, dtype=np.float32) for c in payload["codebooks"]] or None
    index.code_vectors = {int(token): np.asarray(vector) for token, vector in payload["code_vectors"].items()}
    missing = [t for t in index.added_tokens if t not in processor.tokenizer.get_vocab()]
    if missing:  # atomic and rq ids: the main process added these tokens to its tokenizer
        processor.tokenizer.add_tokens(missing)
    return index


def attach_index(model, processor, index: ImageIndex, images, model_args, training_args) -> None:
    """Make `index` the model's: image paths recorded (where the pipeline and the app find the images), the
    tokenizer and every process checked to agree, the vocabulary grown for id tokens, rq code tokens started at
    their codes' vectors (--rq_code_embeddings)."""
    vocabulary = check_identical_on_every_process(processor.tokenizer.get_vocab(), "caption tokenizer vocabulary")
    if training_args.world_size > 1:
        logger.info("Tokenizer vocabulary identical on all %d processes (digest %s)", training_args.world_size,
                    vocabulary)
    index.record_image_paths([images.path(key) for key in index.keys])
    index.check_tokenizer(processor.tokenizer)
    check_identical_on_every_process(index.to_dict(), "image index")
    index.resize_model_embeddings(model)
    if model_args.rq_code_embeddings and initialise_code_embeddings(index, model, training_args.seed):
        logger.info("rq code tokens start at their codes' vectors (--rq_code_embeddings).")
    model.image_index = index


__all__ = ["identifiers_for", "attach_index", "id_embeddings", "coverage_problem"]
