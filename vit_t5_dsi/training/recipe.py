"""The recipe: the defaults a generative run gets on any collection, filled in one place from the flags given.

Every default here was measured (docs/recipe.md has the ablations); a flag given turns its part off or changes it.
"""

from __future__ import annotations

from ..checkpoint.configuration_vit_t5_dsi import DUAL_ENCODER
from ..checkpoint.checkpoint_io import UsageError

# The built-in demo (no data flags): 300 synthetic scenes; semantic leaves of at most 10 images, since with DSI's
# c=100 a 300-image collection's last id token is an arbitrary position among ~100 images.
DEMO_SEMANTIC_MAX_LEAF_SIZE = 10
SEMANTIC_MAX_LEAF_SIZE = 100  # DSI's c
RQ_CELLS_PER_IMAGE = 4  # default rq codes per level: enough cells that few images share every code
# The recipe every generative run gets unless a flag turns a part off (docs/recipe.md has the measurements):
# rq ids cut from a dual encoder trained first (seen Hits@1 0.36 -> 0.86 on the demo), the generative model started
# from that dual encoder's towers, the seed's captioning step writing pseudo-queries for the images that have no
# training captions (held-out Hits@1 0.09 -> 0.75 on the demo), kept only where the dual encoder finds their image,
# and dense re-ranking of the beam.
# --rerank_with for a query file's evaluation: the checkpoint's own dual_encoder/, when it carries one
OWN_DUAL_ENCODER = "own"
RECIPE_IDS = dict(docid_scheme="rq", dense_first=True, start_from_dense=True, rerank_with="dense_first")
# 30 written per image (10 before) and copies of another image's training caption dropped: on the demo, more
# pseudo-queries pass the filter for nearly every held-out image (182 that pass it, for 54 images, instead of 97
# for 44), and a copy would give one caption two ids (issue #21: seen Hits@1 0.771 -> 0.796, held-out 0.733 ->
# 0.794, measured before the deterministic caption tokenizer).
RECIPE_PSEUDO_QUERIES = dict(captioning_ratio=0.5, pseudo_query_at="0.2", num_pseudo_queries=30,
                             pseudo_query_rows_per_image=10, pseudo_query_images="uncaptioned",
                             pseudo_query_filter_top_k=1, pseudo_query_drop_copies=True)
NUM_PSEUDO_QUERIES = 10  # outside the recipe (a continued checkpoint, --pseudo_query_epochs without a filter)
# The dense stage's budget as a share of the generative one (epochs, or --max_steps): the demo's 100 of 150.
DENSE_FIRST_SHARE = 2 / 3
TRAIN_EPOCHS, DEMO_TRAIN_EPOCHS = 300.0, 150.0


def pseudo_query_epochs(data_args) -> list[int]:
    return [int(e) for e in (data_args.pseudo_query_epochs or "").split(",") if e.strip()]


def pseudo_query_fractions(data_args) -> list[float]:
    """--pseudo_query_at as fractions of training (empty when off, or when --pseudo_query_epochs names epochs)."""
    if data_args.pseudo_query_epochs or not data_args.pseudo_query_at or data_args.pseudo_query_at == "none":
        return []
    try:
        fractions = [float(f) for f in data_args.pseudo_query_at.split(",") if f.strip()]
    except ValueError:
        raise UsageError(f"--pseudo_query_at {data_args.pseudo_query_at!r}: expected comma-separated fractions of "
                         "training in (0, 1), e.g. '0.2', or 'none'.") from None
    if not all(0.0 < f < 1.0 for f in fractions):
        raise UsageError(f"--pseudo_query_at must hold fractions in (0, 1), got {data_args.pseudo_query_at!r}.")
    return fractions


def rq_codes_per_level(model_args, num_images: int) -> int:
    """--rq_codes_per_level, or the smallest K with K ** levels >= RQ_CELLS_PER_IMAGE x the images (at least 2)."""
    if model_args.rq_codes_per_level is not None:
        return model_args.rq_codes_per_level
    codes = 2
    while codes ** model_args.rq_num_levels < RQ_CELLS_PER_IMAGE * num_images:
        codes += 1
    return codes


def resolve_recipe(model_args, data_args, training_args=None) -> str:
    """Fill every default the flags left open (the one place), and return the one line that says which recipe
    runs. A generative model trained from scratch gets the whole recipe on any collection; a flag given turns its
    part off or changes it (`--dense_first False`, `--docid_scheme semantic`, `--captioning_ratio 0`,
    `--pseudo_query_at none`, `--pseudo_query_filter_top_k 0`, `--rerank_with none`, `--start_from_dense False`).
    Continuing a checkpoint (--model_name_or_path) and the dual encoder get none of it."""
    if training_args is not None and training_args.num_train_epochs is None:
        training_args.num_train_epochs = DEMO_TRAIN_EPOCHS if data_args.is_demo else TRAIN_EPOCHS
    if model_args.semantic_max_leaf_size is None:
        model_args.semantic_max_leaf_size = (DEMO_SEMANTIC_MAX_LEAF_SIZE if data_args.is_demo
                                             else SEMANTIC_MAX_LEAF_SIZE)
    recipe = model_args.variant != DUAL_ENCODER and model_args.model_name_or_path is None
    if model_args.dense_first is None:
        model_args.dense_first = (recipe and model_args.semantic_embeddings is None
                                  and model_args.docid_scheme in (None, "semantic", "rq"))
    if model_args.docid_scheme is None:
        model_args.docid_scheme = RECIPE_IDS["docid_scheme"] if recipe else "semantic"
    if model_args.start_from_dense is None:
        model_args.start_from_dense = bool(model_args.dense_first)
    if model_args.rerank_with is None:  # a query file is evaluated as the search surfaces search: re-ranked
        model_args.rerank_with = ("dense_first" if model_args.dense_first else
                                  OWN_DUAL_ENCODER if data_args.evaluates_query_file else None)
    elif model_args.rerank_with.lower() in ("none", "off", ""):
        model_args.rerank_with = None
    elif model_args.rerank_with.lower() == "dense_first":
        model_args.rerank_with = "dense_first"

    own_queries = data_args.pseudo_queries is not None or data_args.pseudo_query_epochs is not None
    if data_args.captioning_ratio is None:
        data_args.captioning_ratio = (RECIPE_PSEUDO_QUERIES["captioning_ratio"]
                                      if recipe and data_args.pseudo_queries is None else 0.0)
    if data_args.pseudo_query_at is not None and data_args.pseudo_query_at.lower() in ("none", "off", ""):
        data_args.pseudo_query_at = "none"
    elif data_args.pseudo_query_at is None and not own_queries and recipe and data_args.captioning_ratio > 0:
        data_args.pseudo_query_at = RECIPE_PSEUDO_QUERIES["pseudo_query_at"]
    writes_queries = bool(pseudo_query_epochs(data_args) or pseudo_query_fractions(data_args))
    if data_args.pseudo_query_rows_per_image is None and writes_queries and recipe:
        data_args.pseudo_query_rows_per_image = RECIPE_PSEUDO_QUERIES["pseudo_query_rows_per_image"]
    if data_args.pseudo_query_images is None:  # a file of them is trained on whole unless told otherwise
        data_args.pseudo_query_images = ("all" if data_args.pseudo_queries else
                                         RECIPE_PSEUDO_QUERIES["pseudo_query_images"])
    if data_args.pseudo_query_filter_top_k is None:
        has_dual_encoder = model_args.dense_first or model_args.rerank_with is not None
        data_args.pseudo_query_filter_top_k = (RECIPE_PSEUDO_QUERIES["pseudo_query_filter_top_k"]
                                               if writes_queries and has_dual_encoder else 0)
    filtered = bool(data_args.pseudo_query_filter_top_k)
    if getattr(data_args, "num_pseudo_queries", 0) is None:
        data_args.num_pseudo_queries = (RECIPE_PSEUDO_QUERIES["num_pseudo_queries"] if recipe and filtered
                                        else NUM_PSEUDO_QUERIES)
    if getattr(data_args, "pseudo_query_drop_copies", False) is None:
        data_args.pseudo_query_drop_copies = recipe and filtered
    return recipe_summary(model_args, data_args, writes_queries)


def recipe_summary(model_args, data_args, writes_queries: bool) -> str:
    if model_args.variant == DUAL_ENCODER:
        return "Recipe: the dual encoder alone (dense baseline)."
    parts = [f"{model_args.docid_scheme} ids" + (" from a dual encoder trained first" if model_args.dense_first
                                                 else " from " + (model_args.semantic_embeddings or
                                                                  "the model's own image tower")
                                                 if model_args.docid_scheme in ("semantic", "rq") else ""),
             "generative model started from its towers" if model_args.dense_first and model_args.start_from_dense
             else None,
             f"captioning {data_args.captioning_ratio:g}" if data_args.captioning_ratio else "no captioning",
             ("pseudo-queries at " + (f"epochs {data_args.pseudo_query_epochs}" if data_args.pseudo_query_epochs
                                      else f"{data_args.pseudo_query_at} of training")
              + f" for {data_args.pseudo_query_images} images"
              + (f", kept when the dual encoder ranks their image in its top {data_args.pseudo_query_filter_top_k}"
                 + (" and they copy no other image's training caption"
                    if getattr(data_args, "pseudo_query_drop_copies", False) else "")
                 if data_args.pseudo_query_filter_top_k else "")) if writes_queries
             else f"pseudo-queries from {data_args.pseudo_queries}" if data_args.pseudo_queries else "no pseudo-queries",
             f"re-ranked by {model_args.rerank_with}" if model_args.rerank_with else "no re-ranking"]
    if model_args.model_name_or_path:
        parts.insert(0, f"continuing {model_args.model_name_or_path}")
    return "Recipe: " + "; ".join(p for p in parts if p) + "."


__all__ = ["resolve_recipe", "OWN_DUAL_ENCODER", "recipe_summary", "pseudo_query_epochs", "pseudo_query_fractions",
           "rq_codes_per_level", "RECIPE_IDS", "RECIPE_PSEUDO_QUERIES", "NUM_PSEUDO_QUERIES", "DENSE_FIRST_SHARE",
           "TRAIN_EPOCHS", "DEMO_TRAIN_EPOCHS",
           "DEMO_SEMANTIC_MAX_LEAF_SIZE", "SEMANTIC_MAX_LEAF_SIZE"]
