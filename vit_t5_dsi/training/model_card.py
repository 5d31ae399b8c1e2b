"""Fill the model-card template with what a trained checkpoint is and what it measured."""

from __future__ import annotations

import json
import os
from importlib import resources

from ..checkpoint.configuration_vit_t5_dsi import RETRIEVAL_TASK as TASK
from ..checkpoint.loading import RERANKER_SUBFOLDER

# The Hub's task for "text query -> ranked images" (its only text-to-image *retrieval* category; `text-to-image`
# files a model under image generation). The custom task name goes in the tags and the card.
HUB_PIPELINE_TAG = "visual-document-retrieval"

VARIANT_DESCRIPTIONS = {
    "cross_attention": "a ViT encodes the image and a T5 decoder cross-attends to it to write the image's "
                       "identifier (image-grounded decoder); captions go through T5's encoder to the same decoder.",
    "codebook": "ViT patch states are snapped to T5's word embeddings (visual tokens) that T5 reads like words, "
                "and T5 writes the image's identifier.",
    "dual_encoder": "the dense baseline: pooled ViT and T5-encoder embeddings trained contrastively, retrieval "
                    "by dot product over every indexed image.",
}

# the card's example query when the run names none (the trainer passes one of the collection's own captions)
GENERIC_QUERY = "a caption describing the image you want"
# the query sets whose first caption makes the card's example, in order of preference
EXAMPLE_QUERY_SETS = ("eval", "seen")

ROWS = (("held-out captions", "eval"), ("seen captions", "seen"), ("indexing (image -> id)", "index"),
        ("held-out captions, dense re-ranked", "eval_rerank"), ("seen captions, dense re-ranked", "seen_rerank"),
        ("held-out captions, dual encoder (dense first)", "dense_eval"),
        ("seen captions, dual encoder (dense first)", "dense_seen"))


def metrics_table(metrics: dict[str, float]) -> str:
    """Markdown table of Hits@1/5/10 and MRR@10 per query set; sets that were not evaluated are left out."""
    lines = ["| queries | Hits@1 | Hits@5 | Hits@10 | MRR@10 |", "|---|---|---|---|---|"]
    for name, prefix in ROWS:
        if f"{prefix}_hits@1" not in metrics:
            continue
        values = [metrics.get(f"{prefix}_{m}") for m in ("hits@1", "hits@5", "hits@10", "mrr@10")]
        lines.append(f"| {name} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in values) + " |")
    return "\n".join(lines) if len(lines) > 2 else "_No evaluation was run._"


def example_query(query_sets) -> str | None:
    """The first held-out caption (else the first seen one) of the run's query sets ({"eval": dataset with a
    `caption` column, ...}, as `DSITrainer.eval_sets` holds them): the card's example is the collection's own."""
    for name in EXAMPLE_QUERY_SETS:
        queries = (query_sets or {}).get(name)
        if queries is not None and len(queries) and "caption" in queries.column_names:
            caption = " ".join(str(queries[0]["caption"]).split())
            if caption:
                return caption
    return None


def hub_dataset_tag(dataset_name: str | None) -> str | None:
    """`dataset_name` when it names a Hub dataset; None for a local folder or file (its path is not a dataset id
    and would leak a path of the training machine into the card's metadata)."""
    if not dataset_name or os.path.exists(dataset_name) or dataset_name.startswith((".", "/", "~")):
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(dataset_name)
    except HFValidationError:
        return None
    return dataset_name


def render_model_card(model, metrics: dict[str, float], model_name: str, repo_or_path: str,
                      data_description: str, training_description: str, dataset_name: str | None = None,
                      example_query: str | None = None) -> str:
    """The card's text. `example_query`: a caption of the collection for the usage snippets (see
    `example_query()`); `dataset_name` becomes the `datasets:` tag only when it names a Hub dataset."""
    config, index = model.config, model.image_index
    vision = config.vision_config
    if vision.model_type == "timm_wrapper":
        vision_description = f"timm `{vision.architecture}`"
    else:
        vision_description = (f"{vision.model_type}, hidden size {getattr(vision, 'hidden_size', '?')}, "
                              f"{getattr(vision, 'num_hidden_layers', '?')} layers, {config.image_size} px")
    template = resources.files("vit_t5_dsi").joinpath("templates/model_card.md").read_text(encoding="utf-8")
    return template.format(
        model_name=model_name, variant=config.variant, variant_description=VARIANT_DESCRIPTIONS[config.variant],
        num_images=len(index) if index is not None else "?",
        docid_scheme=index.scheme if index is not None and config.is_generative else "none (dense)",
        max_id_length=index.max_id_length if index is not None else "?",
        vision_description=vision_description, d_model=config.text_config.d_model,
        text_layers=config.text_config.num_layers, data_description=data_description,
        training_description=training_description, metrics_table=metrics_table(metrics),
        repo_or_path=repo_or_path, task=TASK, pipeline_tag=HUB_PIPELINE_TAG,
        auto_class=config.auto_class, example_query=json.dumps(example_query or GENERIC_QUERY, ensure_ascii=False),
        rerank_note=RERANK_NOTE.format(subfolder=RERANKER_SUBFOLDER) if config.is_generative else "",
        dataset_tag=f"datasets:\n- {tag}\n" if (tag := hub_dataset_tag(dataset_name)) else "")


RERANK_NOTE = """
**Re-ranking.** When this repository carries its dual encoder (the `{subfolder}/` folder a default run trains
first), the pipeline, `DSIRetriever` and the vit-t5-dsi CLI and app re-order the top-k of every text query with it
(GENIUS-style fused score, `rerank_weight=0.5`), as the "dense re-ranked" results measure it. Pass
`rerank=False` (`--no_rerank`) for the beam's own order, or `rerank_with=` another dual-encoder checkpoint.
"""


UPDATES_HEADING = "## Images added and removed since training"


def updates_section(card: str, updates: list[dict]) -> str:
    """`card` with its updates section (one row per add or remove, from the checkpoint's update log) replaced or
    appended: the figures above it describe the model as trained, the rows what changed after."""
    lines = [UPDATES_HEADING, "",
             "The figures above are those of training. Each row below changed the index afterwards "
             "(`vit_t5_dsi.add_images` / `remove_images`, logged in `index_updates.json`).", "",
             "| when (UTC) | change | images indexed after | short update | seconds | figures |",
             "|---|---|---|---|---|---|"]
    for u in updates:
        change = f"{u['action']} {u['num_images']}" + (f" (e.g. {', '.join(u['keys'][:3])})" if u.get("keys") else "")
        training = f"{u['update_steps']} steps" if u.get("update_steps") else "none (ids and trie only)"
        figures = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in (u.get("figures") or {}).items()) or "-"
        lines.append(f"| {u['time']} | {change} | {u['num_indexed']} | "
                     f"{training if u['action'] == 'add' else '-'} | {u.get('seconds', 0):.1f} | {figures} |")
    section = "\n".join(lines) + "\n"
    start = card.find(UPDATES_HEADING)
    if start < 0:
        return card.rstrip("\n") + "\n\n" + section
    end = card.find("\n## ", start + len(UPDATES_HEADING))
    return card[:start] + section + (card[end + 1:] if end >= 0 else "")


__all__ = ["render_model_card", "metrics_table", "example_query", "hub_dataset_tag", "updates_section",
           "HUB_PIPELINE_TAG"]
