"""Pseudo-queries: captions a model writes for indexed images, trained on as extra retrieval rows (caption -> id).

This is the seed's first step (Image Caption) feeding its second (DSI), and text DSI's strongest lever
(DSI-QG, NCI: index each item through queries generated from it). A held-out image, whose only real training
signal is its pixels, gets captions that the retrieval task can then learn to map to its identifier.

The file layout is JSONL, one query per row: {"image_id": key, "caption": text} (extra fields are kept as
provenance), so captions from any captioner (BLIP, a human) can be used the same way.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence

import torch
from transformers import TrainerCallback

from ..checkpoint.checkpoint_io import PSEUDO_QUERIES_FILE, atomic_write_text, CollectionError
from . import fault_points
from .image_embeddings import map_images
from .recipe import pseudo_query_epochs, pseudo_query_fractions

logger = logging.getLogger(__name__)


class PseudoQueries:
    """Image key -> its pseudo-queries (distinct, non-empty, in generation order), and where they came from."""

    def __init__(self, queries: dict[str, list[str]] | None = None, source: str = "none"):
        self.queries: dict[str, list[str]] = {}
        self.source = source
        self.captioning_finished = False  # set after the last scheduled refresh when captioning should stop
        self.captioner_metrics: dict[str, float] = {}  # caption quality of the writer, on held-out images
        for key, texts in (queries or {}).items():
            self.add(key, texts)

    def add(self, key: str, texts: Sequence[str]) -> None:
        """Append `texts` to `key`'s queries, dropping empty ones and repeats (whitespace-normalised)."""
        kept = self.queries.setdefault(str(key), [])
        seen = {" ".join(t.split()).lower() for t in kept}
        for text in texts:
            normalised = " ".join(str(text).split())
            if normalised and normalised.lower() not in seen:
                seen.add(normalised.lower())
                kept.append(normalised)
        if not kept:
            del self.queries[str(key)]

    def replace(self, other: "PseudoQueries") -> None:
        """Take `other`'s queries and source (a refresh during training updates the object the collator holds)."""
        self.queries, self.source = dict(other.queries), other.source

    def for_key(self, key: str) -> list[str]:
        return self.queries.get(str(key), [])

    def __len__(self) -> int:
        return sum(len(texts) for texts in self.queries.values())

    @property
    def num_images(self) -> int:
        return len(self.queries)

    def summary(self) -> dict:
        counts = [len(texts) for texts in self.queries.values()]
        return {"source": self.source, **self.captioner_metrics, "num_pseudo_queries": len(self),
                "num_images": self.num_images,
                "per_image_min": min(counts, default=0), "per_image_max": max(counts, default=0),
                "per_image_mean": round(sum(counts) / len(counts), 3) if counts else 0.0}

    # ----- files -----------------------------------------------------------------------------------
    def to_jsonl(self) -> str:
        return "".join(json.dumps({"image_id": key, "caption": text, "source": self.source}) + "\n"
                       for key, texts in self.queries.items() for text in texts)

    def save(self, path: str) -> str:
        return atomic_write_text(path, self.to_jsonl())

    @classmethod
    def load(cls, path: str, known_keys: Sequence[str] | None = None) -> "PseudoQueries":
        """Read a pseudo-query JSONL file; a row with no image_id, an unknown image key or an empty caption is an
        error naming the file and line."""
        known = set(map(str, known_keys)) if known_keys is not None else None
        store, sources = cls(source=path), set()
        try:
            with open(path, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    where = f"{path}:{number}"
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise CollectionError(f"{where}: not valid JSON ({err}).") from err
                    if not isinstance(row, dict) or "image_id" not in row:
                        raise CollectionError(f"{where}: row has no 'image_id'.")
                    key, caption = str(row["image_id"]), row.get("caption")
                    if known is not None and key not in known:
                        raise CollectionError(f"{where}: image {key!r} is not in the indexed collection.")
                    if not isinstance(caption, str) or not caption.strip():
                        raise CollectionError(f"{where}: image {key!r} has an empty caption.")
                    store.add(key, [caption])
                    if row.get("source"):
                        sources.add(str(row["source"]))
        except FileNotFoundError as err:
            raise CollectionError(f"{path}: no such file.") from err
        store.source = ", ".join(sorted(sources)) if sources else path
        return store


def generate_pseudo_queries(model, keys: Sequence[str], images, processor, num_queries: int = 10,
                            batch_size: int = 32, device: torch.device | str | None = None, top_k: int = 20,
                            max_new_tokens: int = 32, suppress_token_ids: Sequence[int] = (),
                            desc: str | None = None, distributed: bool = True) -> dict[str, list[str]]:
    """Sample `num_queries` captions per image with the model's caption decoder (top-k sampling, DSI-QG style),
    deduplicated, empty ones dropped. Under DDP each process captions its share; every process gets all."""

    def sample(pixels):
        tokens = model.caption(pixels, max_new_tokens=max_new_tokens, do_sample=True, top_k=top_k,
                               num_return_sequences=num_queries, suppress_token_ids=suppress_token_ids)
        texts = processor.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        fault_points.reached("pseudo_queries")
        return [texts[i:i + num_queries] for i in range(0, len(texts), num_queries)]

    sampled = map_images(model, keys, images, processor, sample, batch_size, device, desc, distributed)
    store = PseudoQueries(dict(zip(map(str, keys), sampled)))
    return {key: store.for_key(key) for key in map(str, keys) if store.for_key(key)}


def generate_captions(model, keys: Sequence[str], images, processor, batch_size: int = 32,
                      device: torch.device | str | None = None, num_beams: int = 4, max_new_tokens: int = 32,
                      suppress_token_ids: Sequence[int] = (), desc: str | None = None,
                      distributed: bool = True) -> dict[str, str]:
    """One beam-searched caption per image (caption-quality metrics, `DSIRetriever.caption`)."""

    def describe(pixels):
        tokens = model.caption(pixels, max_new_tokens=max_new_tokens, num_beams=num_beams,
                               suppress_token_ids=suppress_token_ids)
        return [" ".join(text.split()) for text in processor.tokenizer.batch_decode(tokens, skip_special_tokens=True)]

    return dict(zip(map(str, keys), map_images(model, keys, images, processor, describe, batch_size, device, desc,
                                                distributed)))


class RoundTripFilter:
    """Keep the pseudo-queries that find their own image under a dual encoder (DSI-QG and PAQ filter generated
    queries the same way): its rank among all indexed images must be below `top_k`. A wrong pseudo-query that
    describes another image teaches the generative model to write that image's id for the other image's captions,
    which is what costs seen-caption quality; every image keeps at least `min_per_image` of its best-ranked ones,
    so no image loses its only path from text to its id.

    `training_captions` (image key -> its training captions): a pseudo-query that *is* a training caption of
    another image (case and spacing ignored) is dropped before any ranking, and is never an image's fallback
    either. It certainly describes that other image, and trained on as this image's query it gives one text two
    labels: the other image's caption would then lead to this image's id."""

    def __init__(self, reranker, index, top_k: int = 3, min_per_image: int = 1,
                 training_captions: dict[str, Sequence[str]] | None = None):
        self.reranker, self.index, self.top_k, self.min_per_image = reranker, index, top_k, min_per_image
        self.captioned_by: dict[str, set[str]] = {}
        for key, texts in (training_captions or {}).items():
            for text in texts:
                self.captioned_by.setdefault(_normalised(text), set()).add(str(key))
        self.last_summary: dict[str, float] = {}

    def is_copy(self, key: str, text: str) -> bool:
        """`text` is a training caption of an image other than `key`."""
        return bool(self.captioned_by.get(_normalised(text), set()) - {str(key)})

    def __call__(self, queries: dict[str, list[str]]) -> dict[str, list[str]]:
        written = sum(len(texts) for texts in queries.values())
        queries = {key: [text for text in texts if not self.is_copy(key, text)] for key, texts in queries.items()}
        copies = written - sum(len(texts) for texts in queries.values())
        queries = {key: texts for key, texts in queries.items() if texts}
        pairs = [(key, text) for key, texts in queries.items() for text in texts]
        if not pairs:
            self.last_summary = {"filter_top_k": self.top_k, "filter_written": written, "filter_kept": 0,
                                 "filter_round_trip_hits": 0, "filter_copies_dropped": copies}
            return queries
        gold = self.index.positions_of([key for key, _ in pairs]).tolist()
        ranks = self.reranker.gold_ranks([text for _, text in pairs], gold, self.index)
        by_key: dict[str, list[tuple[int, int, str]]] = {}
        for order, ((key, text), rank) in enumerate(zip(pairs, ranks.tolist())):
            by_key.setdefault(key, []).append((rank, order, text))
        kept: dict[str, list[str]] = {}
        for key, scored in by_key.items():
            passing = [entry for entry in scored if entry[0] < self.top_k]
            if len(passing) < self.min_per_image:
                passing = sorted(scored)[:self.min_per_image]
            kept[key] = [text for _, _, text in sorted(passing, key=lambda entry: entry[1])]
        num_kept = sum(len(v) for v in kept.values())
        self.last_summary = {"filter_top_k": self.top_k, "filter_written": written, "filter_kept": num_kept,
                             "filter_round_trip_hits": int((ranks < self.top_k).sum()),
                             "filter_copies_dropped": copies}
        logger.info("Round-trip filter (dual encoder top-%d): kept %d of %d pseudo-queries (%d copies of another "
                    "image's training caption dropped; %d pass, the rest keep each image's best %d).", self.top_k,
                    num_kept, written, copies, self.last_summary["filter_round_trip_hits"], self.min_per_image)
        return kept


def _normalised(text: str) -> str:
    return " ".join(str(text).split()).lower()


REFRESH_STATE_FILE = "pseudo_query_refresh.json"  # in checkpoints: which refreshes are done


class PseudoQueryRefresh(TrainerCallback):
    """The one-command route: at the start of each epoch in `epochs`, the model being trained writes new
    pseudo-queries for `keys` with its caption decoder, and they replace `store`'s, which the collator reads.

    Co-trained captioning rows teach the decoder to caption first; from the first refresh on, pseudo-query rows
    carry the new captions. After the last refresh captioning rows stop (unless `stop_captioning_after_last` is
    False): in a mixed batch every label is padded to caption length, so they cost far more than they weigh. The store is written to `output_dir/pseudo_queries.jsonl` at each refresh and into
    every checkpoint, so a resumed run trains on the same pseudo-queries.
    """

    def __init__(self, store: PseudoQueries, keys: Sequence[str], images, processor, epochs: Sequence[int],
                 num_queries: int = 10, batch_size: int = 32, top_k: int = 20,
                 suppress_token_ids: Sequence[int] = (), progress: bool = True,
                 stop_captioning_after_last: bool = True, references: dict[str, list[str]] | None = None,
                 query_filter=None, fractions: Sequence[float] = ()):
        self.store, self.keys, self.images, self.processor = store, list(keys), images, processor
        self.epochs = sorted(set(int(e) for e in epochs))
        self.num_queries, self.batch_size, self.top_k = num_queries, batch_size, top_k
        self.suppress_token_ids, self.progress = list(suppress_token_ids), progress
        self.stop_captioning_after_last = stop_captioning_after_last
        self.references = references or {}
        self.refreshed: list[int] = []
        self.seconds_spent = 0.0  # writing (and filtering) pseudo-queries, every refresh so far
        self.query_filter, self.fractions = query_filter, sorted(float(f) for f in fractions)

    def on_train_begin(self, args, state, control, **kwargs):
        """Refreshes given as fractions of training become epochs once the trainer knows how many it runs (from
        --num_train_epochs or --max_steps), so one schedule fits any collection and budget."""
        if self.fractions:
            self.epochs = epochs_for_fractions(self.fractions, state.num_train_epochs)
            if not self.epochs:
                logger.warning("Pseudo-queries are not written: a refresh needs an epoch boundary after the first "
                               "epoch, and this run trains %g epoch(s).", state.num_train_epochs)

    def on_epoch_begin(self, args, state, control, model=None, **kwargs):
        epoch = epoch_index(state)
        if epoch not in self.epochs or epoch in self.refreshed:
            return
        start = time.perf_counter()
        # Sampled from a generator of their own, seeded by (seed, epoch), and leaving the training RNG as it was:
        # a run resumed before this epoch writes the same pseudo-queries and then trains on the same dropout masks.
        devices = [args.device] if args.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(args.seed * 1_000_003 + epoch)
            queries = generate_pseudo_queries(model, self.keys, self.images, self.processor, self.num_queries,
                                              self.batch_size, args.device, self.top_k,
                                              suppress_token_ids=self.suppress_token_ids,
                                              desc=f"Pseudo-queries (epoch {epoch})" if self.progress else None)
        if self.query_filter is not None:
            queries = self.query_filter(queries)
        self.store.replace(PseudoQueries(queries, source=f"the model's own caption decoder at epoch {epoch} "
                                                         f"(step {state.global_step}), {self.num_queries} samples "
                                                         f"per image, top-k {self.top_k}"))
        if self.references:  # how good the captioner was when it wrote them (held-out images, real captions)
            from .metrics import caption_metrics

            written = generate_captions(model, list(self.references), self.images, self.processor, self.batch_size,
                                        args.device)
            self.store.captioner_metrics = {f"writer_{k}": v for k, v in
                                            caption_metrics(written, self.references).items()}
        if self.query_filter is not None:
            self.store.captioner_metrics.update(self.query_filter.last_summary)
        self.seconds_spent += time.perf_counter() - start
        self.store.captioner_metrics["writing_seconds"] = round(self.seconds_spent, 1)
        self.refreshed.append(epoch)
        self.store.captioning_finished = self.stop_captioning_after_last and epoch == self.epochs[-1]
        if state.is_world_process_zero:
            self.store.save(os.path.join(args.output_dir, PSEUDO_QUERIES_FILE))
            summary = self.store.summary()
            logger.info("Epoch %d: %d pseudo-queries for %d images (%.1f s); writer's held-out caption BLEU %s",
                        epoch, summary["num_pseudo_queries"], summary["num_images"], time.perf_counter() - start,
                        f"{summary['writer_caption_bleu']:.1f}" if "writer_caption_bleu" in summary else "-")

    def save_to_checkpoint(self, checkpoint: str) -> None:
        """Every checkpoint gets the pseudo-queries and which refreshes are done, so a resumed run neither
        repeats nor skips one. DSITrainer calls this (main process) before it marks the checkpoint complete."""
        if len(self.store):
            self.store.save(os.path.join(checkpoint, PSEUDO_QUERIES_FILE))
        atomic_write_text(os.path.join(checkpoint, REFRESH_STATE_FILE), json.dumps({
            "refreshed": self.refreshed, "captioning_finished": self.store.captioning_finished,
            "captioner_metrics": self.store.captioner_metrics}))

    def restore(self, checkpoint: str, known_keys: Sequence[str]) -> None:
        """The state `save_to_checkpoint` wrote into `checkpoint` (nothing was refreshed when the file is absent)."""
        state_path = os.path.join(checkpoint, REFRESH_STATE_FILE)
        if not os.path.isfile(state_path):
            return
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
        saved = os.path.join(checkpoint, PSEUDO_QUERIES_FILE)
        if os.path.isfile(saved):
            self.store.replace(PseudoQueries.load(saved, known_keys=known_keys))
        self.refreshed = [int(e) for e in state["refreshed"]]
        self.store.captioning_finished = bool(state["captioning_finished"])
        self.store.captioner_metrics = dict(state.get("captioner_metrics") or {})
        self.seconds_spent = float(self.store.captioner_metrics.get("writing_seconds", 0.0))


def pseudo_queries_for(data_args, training_args, splits, images, processor, references: dict[str, list[str]],
                       query_filter=None) -> tuple[PseudoQueries, PseudoQueryRefresh | None]:
    """The pseudo-queries to train on (a `PseudoQueries` the collator reads) and, when the model writes them during
    training, the callback that does. Evaluation captions never enter: the captioner learns from training
    captions only, and a file's rows must name indexed images."""
    indexed = splits.index["image_key"][:]
    keys = indexed
    if data_args.pseudo_query_images == "uncaptioned":
        captioned = set(splits.train_queries["image_key"][:])
        keys = [key for key in keys if key not in captioned]
    if data_args.pseudo_queries:
        store = PseudoQueries.load(data_args.pseudo_queries, known_keys=indexed)
        if data_args.pseudo_query_images == "uncaptioned":
            store = PseudoQueries({key: store.for_key(key) for key in keys}, store.source)
        return store, None
    epochs, fractions = pseudo_query_epochs(data_args), pseudo_query_fractions(data_args)
    if not epochs and not fractions:
        return PseudoQueries(), None
    store = PseudoQueries()
    refresh = PseudoQueryRefresh(store, keys, images, processor, epochs, data_args.num_pseudo_queries,
                                 training_args.per_device_eval_batch_size, data_args.pseudo_query_top_k,
                                 progress=training_args.should_log and not training_args.disable_tqdm,
                                 stop_captioning_after_last=not data_args.keep_captioning,
                                 references=references, query_filter=query_filter, fractions=fractions)
    if training_args.resume_from_checkpoint:  # it trains on the pseudo-queries it had, refreshes what it had not
        refresh.restore(training_args.resume_from_checkpoint, known_keys=indexed)
    return store, refresh


def pseudo_query_slots(store: PseudoQueries, refresh: PseudoQueryRefresh | None, data_args) -> dict[str, int]:
    """Training rows per epoch per image for pseudo-queries: a file's queries as they are, or a fixed number per
    image for queries the model writes during training (the stream is built before they exist)."""
    if refresh is None:
        return {key: len(store.for_key(key)) for key in store.queries}
    return {key: data_args.pseudo_query_rows_per_image or data_args.num_pseudo_queries for key in refresh.keys}


def epochs_for_fractions(fractions: Sequence[float], num_epochs: float) -> list[int]:
    """Epoch boundaries nearest to each fraction of `num_epochs`, after the first epoch and before the last."""
    last = int(num_epochs) - 1 if float(num_epochs).is_integer() else int(num_epochs)
    return sorted({min(max(1, round(f * num_epochs)), last) for f in fractions} - {0}) if last >= 1 else []


def epoch_index(state) -> int:
    """The epoch a callback's `on_epoch_begin` starts: `state.epoch` is a float that lands a rounding error either
    side of the integer at an epoch's start, and holds a fraction when a run resumes inside an epoch."""
    return int((state.epoch or 0.0) + 1e-6)


__all__ = ["PseudoQueries", "PseudoQueryRefresh", "generate_pseudo_queries", "generate_captions",
           "PSEUDO_QUERIES_FILE", "REFRESH_STATE_FILE", "pseudo_queries_for", "pseudo_query_slots", "RoundTripFilter", "epoch_index", "epochs_for_fractions"]
