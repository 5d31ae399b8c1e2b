"""The docs stay true to the code: every flag in docs/flags.md, the README's two commands where CI finds them, and
every recorded figure naming the command that produced it."""

import glob
import importlib.util
import json
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_generator():
    spec = importlib.util.spec_from_file_location("generate_flags", os.path.join(ROOT, "docs", "generate_flags.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flags_page_is_what_the_parser_prints():
    """The project's own flags exactly as the generator writes them. The inherited Seq2SeqTrainingArguments table
    follows the installed transformers, so only `python docs/generate_flags.py --check` compares it."""
    generator = load_generator()
    current = open(os.path.join(ROOT, "docs", "flags.md"), encoding="utf-8").read()
    inherited = "## Training: the rest of"
    assert generator.render().split(inherited)[0] == current.split(inherited)[0], (
        "docs/flags.md is out of date: run python docs/generate_flags.py")
    from transformers import HfArgumentParser

    from vit_t5_dsi.training.arguments import DataArguments, DSITrainingArguments, ModelArguments
    own = set(DSITrainingArguments.__annotations__)
    parser = HfArgumentParser((ModelArguments, DataArguments, DSITrainingArguments))
    flags = {option for action in parser._actions for option in action.option_strings
             if option.startswith("--") and "-" not in option[2:] and option != "--help"
             and (action.dest in own or action.dest in ModelArguments.__dataclass_fields__
                  or action.dest in DataArguments.__dataclass_fields__)}
    documented = set(re.findall(r"`(--[a-z0-9_]+)`", current.split(inherited)[0]))
    assert flags and flags <= documented, sorted(flags - documented)


def readme_block(marker: str) -> str:
    """The first ```bash block after the line holding `marker`, as .ci/run extracts it."""
    lines = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read().splitlines()
    start = next(i for i, line in enumerate(lines) if marker in line)
    opening = next(i for i in range(start, len(lines)) if lines[i].startswith("```bash"))
    closing = next(i for i in range(opening + 1, len(lines)) if lines[i].startswith("```"))
    return "\n".join(lines[opening + 1:closing])


def test_readme_keeps_the_commands_ci_runs():
    test_command = 'pip install -e ".[test,wandb,app,openmoji]" && python -m pytest -q -m "not slow" -n 2 tests'
    assert readme_block("<!-- test-command -->") == test_command
    assert readme_block("Install and run the built-in demo") == "pip install -e . && accelerate launch run_dsi_image.py"


def test_every_figure_names_its_command_and_is_drawn():
    sources = sorted(glob.glob(os.path.join(ROOT, "docs", "figures", "*.json")))
    assert sources
    for source in sources:
        data = json.load(open(source, encoding="utf-8"))
        assert data.get("command") and data.get("kind") and data.get("rows"), source
        assert os.path.exists(source[:-len(".json")] + ".png"), f"{source}: run python benchmarks/plot_figures.py"
