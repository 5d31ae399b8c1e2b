"""Errors that mean "the input is wrong", not "the code is wrong".

The command-line scripts print these as one line and exit with status 2 (argparse's convention for usage errors);
anything else keeps its traceback, because it is a bug worth reporting.
"""

from __future__ import annotations


class UsageError(ValueError):
    """A bad flag, a bad flag combination, or a state of the output directory the run refuses to touch."""


class CollectionError(UsageError):
    """Bad input in a collection; the message names the file and the item."""


# Refusals several entry points share (pipeline, retriever, trainer, flags), worded once.
NO_IMAGE_INDEX = ("This model has no image index (image_index.json): it was never trained on a collection, so there is "
                  "nothing to retrieve.")


def cannot_rerank_a_dual_encoder(what: str = "Re-ranking") -> str:
    """`what` (a flag or an argument) asks to re-rank where the model is a dual encoder."""
    return f"{what} re-orders a generative model's top-k: the dual encoder ranks by itself."


__all__ = ["UsageError", "CollectionError", "NO_IMAGE_INDEX", "cannot_rerank_a_dual_encoder"]
