#!/usr/bin/env python
"""Write docs/flags.md from the parser `python run_dsi_image.py --help` prints, so the page lists every flag.

    python docs/generate_flags.py            # rewrite docs/flags.md
    python docs/generate_flags.py --check    # exit 1 when docs/flags.md is not what this would write

Four tables: the project's model flags, its data flags, the training flags it adds or whose defaults it changes
(`DSITrainingArguments`), and the rest of `Seq2SeqTrainingArguments`, unchanged (transformers' own help text).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from transformers import HfArgumentParser, Seq2SeqTrainingArguments  # noqa: E402

from vit_t5_dsi.training.arguments import DataArguments, DSITrainingArguments, ModelArguments  # noqa: E402

OUTPUT = os.path.join(HERE, "flags.md")

HEADER = """# Every flag of `run_dsi_image.py`

Written by `python docs/generate_flags.py` from the parser behind `python run_dsi_image.py --help`; do not edit
by hand (rerun it after changing a flag). Flags can also come from one file: `python run_dsi_image.py run.yaml`
(or `.json`). A boolean flag takes `True`/`False` (`--dense_first False`); a bare `--flag` means True.

Terms (held-out, seen, indexing, identifier, code, pseudo-query, re-ranking, dense stage) are defined in the
glossary of [architecture.md](architecture.md#glossary); the recipe the defaults make is in [recipe.md](recipe.md).
"""

CACHE_NOTE = """
**The image cache and DataLoader workers.** `--image_cache_mb` is one budget per machine, split evenly between
its training processes. Each process's share is a block of shared memory that all its DataLoader workers fill and
read, and that outlives the workers Trainer starts every epoch: later epochs decode nothing, with any
`--dataloader_num_workers`, and `--dataloader_persistent_workers` is not needed (it is refused with `--augment` or
pseudo-queries written during training, whose per-epoch state persistent workers would freeze).
"""


def cell(text) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def default_of(action) -> str:
    if action.default is None or action.default is argparse.SUPPRESS:
        return ""
    value = action.default
    if hasattr(value, "value"):  # enums (IntervalStrategy, ...)
        value = value.value
    return f"`{value}`"


def ours(name: str, by_field) -> str:
    if name == "num_train_epochs":
        return "300 (the built-in demo: 150)"
    return cell(by_field[name][0].default)


def flags_by_field(parser: argparse.ArgumentParser) -> dict[str, list[argparse.Action]]:
    """Field name -> the parser's actions for it (a True-default bool also gets --no_NAME)."""
    by_field: dict[str, list[argparse.Action]] = {}
    for action in parser._actions:
        if action.dest == "help":
            continue
        by_field.setdefault(action.dest, []).append(action)
    return by_field


def row(name: str, actions: list[argparse.Action]) -> str:
    options = []
    for action in actions:
        options.extend(s for s in action.option_strings if s.startswith("--") and "-" not in s[2:])
    main = next(a for a in actions if not any(s.startswith("--no_") for s in a.option_strings))
    names = ", ".join(f"`{o}`" for o in dict.fromkeys(options)) or f"`--{name}`"
    return f"| {names} | {cell(default_of(main))} | {cell(main.help or '')} |"


def table(title: str, intro: str, names: list[str], by_field) -> list[str]:
    lines = [f"## {title}", "", intro, "", "| flag | default | meaning |", "|---|---|---|"]
    lines += [row(name, by_field[name]) for name in names if name in by_field]
    return lines + [""]


def render() -> str:
    parser = HfArgumentParser((ModelArguments, DataArguments, DSITrainingArguments))
    by_field = flags_by_field(parser)
    model = [f.name for f in dataclasses.fields(ModelArguments)]
    data = [f.name for f in dataclasses.fields(DataArguments)]
    base = {f.name: f for f in dataclasses.fields(Seq2SeqTrainingArguments)}
    own = [name for name in DSITrainingArguments.__dataclass_fields__
           if name in DSITrainingArguments.__dict__.get("__annotations__", {})]
    added = [name for name in own if name not in base]
    changed = [name for name in own if name in base and by_field[name][0].default != base[name].default]
    restated = [name for name in own if name in base and name not in changed]
    rest = [name for name in by_field if name not in set(model) | set(data) | set(own)]
    lines = [HEADER]
    lines += table("Model and identifiers", "`ModelArguments`: the variant, its parts, identifiers, the dense stage "
                   "and re-ranking.", model, by_field)
    lines += table("Data", "`DataArguments`: the collection, the protocol's splits, captioning and pseudo-queries, "
                   "image loading, the built-in demo.", data, by_field)
    lines += CACHE_NOTE.splitlines()[1:] + [""]
    changed_list = ", ".join(f"`--{n}` {ours(n, by_field)} (transformers: "
                             f"{cell(getattr(base[n].default, 'value', base[n].default))})" for n in changed)
    lines += table("Training: what this project adds or changes",
                   "`DSITrainingArguments`, a `Seq2SeqTrainingArguments` subclass. Added: "
                   + ", ".join(f"`--{n}`" for n in added) + ". Every default it changes, so that the no-argument "
                   "run is the built-in demo: " + changed_list + ". Restated with their transformers default and "
                   "a shorter help: " + ", ".join(f"`--{n}`" for n in restated) + ".", own, by_field)
    lines += table("Training: the rest of `Seq2SeqTrainingArguments`",
                   "Unchanged from transformers (their help text). Not every one applies to this script: evaluation "
                   "is always constrained beam search with `--retrieval_k` beams.", rest, by_field)
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="Exit 1 when docs/flags.md is out of date.")
    args = parser.parse_args()
    text = render()
    if args.check:
        current = open(OUTPUT, encoding="utf-8").read() if os.path.exists(OUTPUT) else ""
        if current != text:
            sys.exit("docs/flags.md is out of date: run python docs/generate_flags.py")
        print("docs/flags.md is up to date")
        return
    with open(OUTPUT, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()
