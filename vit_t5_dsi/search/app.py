#!/usr/bin/env python
"""A Gradio web demo over a trained checkpoint: type a caption (or upload an image), see the top-k images.

    pip install -e ".[app]"
    vit-t5-dsi-app                                  # the built-in demo's checkpoint (dsi_demo_output)
    vit-t5-dsi-app --model CKPT_OR_HUB_ID --image_dir DIR_OF_THE_IMAGES      # or: python -m vit_t5_dsi.search.app

It runs the checkpoint's `text-to-image-retrieval` pipeline (the same one `transformers.pipeline` loads), re-ranked
by the checkpoint's own dual encoder when it carries one (--no_rerank turns that off), and shows the model card's
metrics beside the results. Images are served from the paths recorded with the index, from `--image_dir` when the
collection lives elsewhere (a checkpoint from the Hub, a moved folder), or decoded from the parquet / Hub dataset
the model was trained on (`--dataset_name`) when the index records no files. The address is Gradio's:
GRADIO_SERVER_NAME / GRADIO_SERVER_PORT, unless --host / --port say otherwise.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import threading
import time
import warnings

from vit_t5_dsi import RETRIEVAL_TASK, ViTT5DSIProcessor, load_dsi_model
from vit_t5_dsi.checkpoint.image_index_files import checkpoint_file
from vit_t5_dsi.search.app_safety import (DEFAULT_CONCURRENCY_LIMIT, DEFAULT_MAX_QUEUE_SIZE, MAX_UPLOAD, RefusedQuery,
                                   blocked_folders, check_text, read_upload, served_folders)
from vit_t5_dsi.checkpoint.loading import RERANKER_SUBFOLDER
from vit_t5_dsi.search.collection_images import images_for

logger = logging.getLogger("app")

DEFAULT_MODEL = "dsi_demo_output"
EXAMPLE_QUERY = "a large red circle in the top left"
CAPTION_SEPARATOR = " · "  # gallery captions: "image_key · score"


def load_search_pipeline(name_or_path: str, device: str | None = None, image_dir: str | None = None,
                         rerank: bool | None = None, rerank_with: str | None = None, rerank_weight: float = 0.5):
    """The checkpoint's `text-to-image-retrieval` pipeline, built from this package's classes (no remote code).
    It re-ranks with the checkpoint's `dual_encoder/` (local or Hub) unless `rerank=False`, as every surface does.
    `device` None: the pipeline's own choice (the first GPU, else the CPU)."""
    from transformers import pipeline

    model = load_dsi_model(name_or_path)
    processor = ViTT5DSIProcessor.from_pretrained(name_or_path)
    return pipeline(RETRIEVAL_TASK, model=model, processor=processor, image_dir=image_dir, rerank=rerank,
                    rerank_with=rerank_with, rerank_weight=rerank_weight, device=device)


def card_metrics(name_or_path: str) -> str:
    """The metrics table of the checkpoint's model card (README.md), as Markdown."""
    path = checkpoint_file(name_or_path, "README.md")
    if path is None:
        return "_This checkpoint has no model card (README.md), so no metrics to show._"
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "## Results"), None)
    if start is None:
        return "_The model card has no Results section._"
    table = []
    for line in lines[start + 1:]:
        if line.startswith("|"):
            table.append(line)
        elif table or line.startswith("#"):
            break
    return "\n".join(["### Measured on its collection", *table]) if table else "_The model card has no metrics._"


def unknown_words(tokenizer, text: str) -> list[str]:
    """Words the model cannot have read: the tokenizer maps part of them to its unknown token, or its longest piece
    covers less than half of the word (it is spelt out of fragments of other words: `z ##e ##b ##ra`). A word
    stored as `▁word`, or a learned piece plus an ending (`triangle ##s`), is known."""
    words = list(dict.fromkeys(re.findall(r"[^\W\d_]+", text.lower())))
    if not words:
        return []
    unknown = []
    for word, ids in zip(words, tokenizer(words, add_special_tokens=False)["input_ids"]):
        pieces = [piece.removeprefix("##").removeprefix("\u2581") for piece in tokenizer.convert_ids_to_tokens(ids)]
        if (tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids) or (
                len(word) > 1 and 2 * max(len(piece) for piece in pieces) < len(word)):
            unknown.append(word)
    return unknown


class SearchPage:
    """What the page does with a query: results for the gallery and a message (never a stack trace). Safe to call
    from several threads: searches on the one pipeline run one at a time (a transformers pipeline keeps per-call
    state and the model's generation is not re-entrant). Hostile input gets a message (`app_safety`)."""

    def __init__(self, search, image_dir: str | None = None, collection_images=None, images_note: str = ""):
        self.search, self.image_dir = search, image_dir
        self.num_images = len(search.image_index)
        self.has_files = search.image_index.image_files is not None
        # a collection held as bytes (parquet / Hub dataset): hits are decoded from it; else why there are no images
        self.collection_images, self.images_note = collection_images, images_note
        self.lock = threading.Lock()

    def __call__(self, text: str | None, image, top_k: float):
        try:
            return self._answer(text, image, top_k)
        except RefusedQuery as refused:
            return [], str(refused)
        except Exception as err:  # the page gets a message; the log keeps the traceback
            logger.exception("search failed")
            return [], f"The search failed ({type(err).__name__}). The server is still up; try another query."

    def _answer(self, text, image, top_k):
        started = time.perf_counter()
        try:
            top_k = max(1, min(int(float(top_k or 1)), self.num_images))
        except (TypeError, ValueError, OverflowError):
            top_k = min(5, self.num_images)
        text, notes = check_text(text if isinstance(text, str) else "")
        if not text and image is None:
            return [], "\n\n".join(["Type a caption, or upload an image, then press **Search**.", *notes])
        if text:
            query = text
            unknown = unknown_words(self.search.tokenizer, text)
            if unknown:
                notes.append(f"Not in the model's caption vocabulary: **{', '.join(unknown)}**. The model has "
                             "never read these words, so the results may not match them.")
            if image is not None:
                notes.append("Searching by the text; clear it to search by the uploaded image.")
        else:
            query = read_upload(image)
        try:
            with self.lock:
                hits = self.search(query, top_k=top_k)
        except (ValueError, TypeError) as err:
            return [], f"Could not search: {err}"
        gallery, missing = [], []
        for hit in hits:
            shown = hit["path"] or (self.collection_images.image(hit["image_key"]) if self.collection_images else None)
            if shown is None:
                missing.append(hit)
            else:
                gallery.append((shown, f"{hit['image_key']}{CAPTION_SEPARATOR}{hit['score']:.3f}"))
        if missing:
            where = (f"--image_dir {self.image_dir}" if self.image_dir else
                     f"--dataset_name {self.collection_images.source}" if self.collection_images else
                     "the paths recorded with the index" if self.has_files else "this checkpoint (it records none)")
            listing = ", ".join(f"`{hit['image_key']}` ({hit['score']:.3f})" for hit in missing)
            hint = self.images_note or ("" if self.collection_images else "Start the app with `--image_dir` set to "
                                        "the folder holding the collection's images.")
            notes.append(f"{len(missing)} of the {len(hits)} results have no image file in {where}: {listing}. "
                         + hint)
        kind = "text" if isinstance(query, str) else "image"
        how = ", re-ranked by the dual encoder" if kind == "text" and self.search.reranker is not None else ""
        summary = (f"Top {len(hits)} of {self.num_images} indexed images for the {kind} query{how} "
                   f"({time.perf_counter() - started:.2f} s).")
        return gallery, "\n\n".join([summary, *notes])


def build_app(search, metrics_markdown: str, model_name: str, image_dir: str | None = None, collection_images=None,
              images_note: str = ""):
    import gradio as gr

    page = SearchPage(search, image_dir, collection_images, images_note)
    default_k = min(5, page.num_images)
    with gr.Blocks(title=f"vit-t5-dsi: {model_name}") as app:
        gr.Markdown(f"# Text-to-image retrieval with `{model_name}`\n"
                    f"A generative index over **{page.num_images} images** "
                    f"(`{search.model.config.variant}` variant): the model writes the identifiers of the "
                    "images that match your caption.")
        with gr.Row():
            with gr.Column(scale=3):
                text = gr.Textbox(label="Caption", placeholder=EXAMPLE_QUERY, elem_id="query")
                with gr.Row():
                    image = gr.Image(label="...or search by an image (optional)", type="pil", height=160,
                                     elem_id="query-image")
                    top_k = gr.Slider(1, min(50, page.num_images), value=default_k, step=1, label="top-k",
                                      elem_id="top-k")
                button = gr.Button("Search", variant="primary", elem_id="search")
                message = gr.Markdown(elem_id="message")
                gallery = gr.Gallery(label="Results", columns=5, height="auto", elem_id="results")
            with gr.Column(scale=2):
                gr.Markdown(metrics_markdown, elem_id="metrics")
        inputs, outputs = [text, image, top_k], [gallery, message]
        # preprocess=False: the page decodes uploads itself (app_safety.read_upload), so a bad file gets a message
        # instead of Gradio's decoding error; Gradio still checks that an upload's path is one of its own
        button.click(page, inputs, outputs, api_name="search", preprocess=False)
        text.submit(page, inputs, outputs, api_name=False, preprocess=False)
    return app


def allowed_roots(search, image_dir: str | None) -> list[str]:
    """The folders the web server may serve files from: the collection's images, nothing else."""
    return served_folders(search, image_dir)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"Checkpoint directory or Hub id written by run_dsi_image.py (default: {DEFAULT_MODEL}, "
                             "the built-in demo's output).")
    parser.add_argument("--image_dir", default=None,
                        help="Folder holding the collection's images, when they are not where they were indexed.")
    parser.add_argument("--dataset_name", default=None,
                        help="The parquet folder or Hub dataset the model was trained on (run_dsi_image.py "
                             "--dataset_name), to show images the index holds as bytes. Default: the run's "
                             "recorded source (protocol.json) when it is a local folder.")
    parser.add_argument("--host", default=None,
                        help="Address to serve on (0.0.0.0 for every interface). Default: GRADIO_SERVER_NAME, else "
                             "127.0.0.1.")
    parser.add_argument("--port", type=int, default=None,
                        help="Port to serve on. Default: GRADIO_SERVER_PORT, else the first free port from 7860.")
    parser.add_argument("--no_rerank", action="store_true",
                        help=f"Keep the beam's order: do not re-rank with the checkpoint's {RERANKER_SUBFOLDER}/.")
    parser.add_argument("--rerank_with", default=None,
                        help=f"Re-rank text queries with this dual-encoder checkpoint instead of MODEL/"
                             f"{RERANKER_SUBFOLDER} (the default when the checkpoint carries one).")
    parser.add_argument("--rerank_weight", type=float, default=0.5,
                        help="Weight of the dense score against the generative one, in [0, 1].")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available).")
    parser.add_argument("--share", action="store_true", help="Also open a public Gradio share link.")
    parser.add_argument("--concurrency_limit", type=int, default=DEFAULT_CONCURRENCY_LIMIT,
                        help="Searches run at once (Gradio's queue); the pipeline serialises the model part anyway.")
    parser.add_argument("--max_queue_size", type=int, default=DEFAULT_MAX_QUEUE_SIZE,
                        help="Requests that may wait in the queue; more are refused with 'queue full'.")
    args = parser.parse_args(argv)
    if args.rerank_with is not None and args.rerank_with.lower() in ("auto", "none"):  # the earlier spellings
        if args.rerank_with.lower() == "none":
            warnings.warn("--rerank_with none is deprecated: use --no_rerank.", FutureWarning, stacklevel=2)
            args.no_rerank = True
        args.rerank_with = None
    if args.no_rerank and args.rerank_with:
        parser.error("--no_rerank and --rerank_with contradict each other.")
    if args.image_dir and not os.path.isdir(args.image_dir):
        parser.error(f"--image_dir {args.image_dir}: no such directory.")
    if args.model == DEFAULT_MODEL and not os.path.isdir(DEFAULT_MODEL):
        parser.error(f"--model: no {DEFAULT_MODEL}/ here; train the demo first (accelerate launch run_dsi_image.py) "
                     "or pass --model CKPT.")
    args.parser = parser
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    parser = args.parser
    started = time.perf_counter()
    try:
        search = load_search_pipeline(args.model, args.device, args.image_dir, False if args.no_rerank else None,
                                      args.rerank_with, args.rerank_weight)
    except (OSError, ValueError) as err:
        parser.error(f"--model {args.model}: {err}")
    try:
        collection_images, images_note = images_for(args.model, search.image_index, args.dataset_name)
    except (OSError, ValueError) as err:
        parser.error(f"--dataset_name {args.dataset_name}: {err}")
    reranked = ", re-ranked by a dual encoder" if search.reranker is not None else ""
    print(f"Loaded {args.model} ({len(search.image_index)} images, {search.model.config.variant}{reranked}) in "
          f"{time.perf_counter() - started:.1f} s", flush=True)
    loaded = time.perf_counter()
    app = build_app(search, card_metrics(args.model), os.path.basename(os.path.normpath(args.model)), args.image_dir,
                    collection_images, images_note)
    # one search at a time reaches the model (the page's lock); the queue bounds how many wait
    app.queue(default_concurrency_limit=args.concurrency_limit, max_size=args.max_queue_size)
    served = allowed_roots(search, args.image_dir)
    blocked = blocked_folders([args.model, args.rerank_with], served)  # the model's dual_encoder/ lies inside it
    # host/port None: Gradio reads GRADIO_SERVER_NAME / GRADIO_SERVER_PORT, as hosting platforms expect
    app.launch(server_name=args.host, server_port=args.port, share=args.share, allowed_paths=served,
               blocked_paths=blocked, max_file_size=MAX_UPLOAD, show_error=True, quiet=False,
               prevent_thread_lock=True)
    print(f"Serving {time.perf_counter() - loaded:.1f} s after the model loaded.", flush=True)
    app.block_thread()
    return 0


if __name__ == "__main__":
    sys.exit(main())
