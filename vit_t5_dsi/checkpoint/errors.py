"""Errors that mean "the input is wrong", not "the code is wrong".

The command-line scripts print these as one line and exit with status 2 (argparse's convention for usage errors);
anything else keeps its traceback, because it is a bug worth reporting.
"""

from __future__ import annotations


class UsageError(ValueError):
    """A bad flag, a bad flag combination, or a state of the output directory the run refuses to touch."""


class CollectionError(UsageError):
    """Bad input in a collection; the message names the file and the item."""


__all__ = ["UsageError", "CollectionError"]
