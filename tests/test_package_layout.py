"""The package's shape is part of its contract: what a checkpoint carries, which way imports point, module size."""

import ast
import os
import subprocess
import sys

import pytest
import torch

from conftest import tiny_config
from vit_t5_dsi import ViTT5DSIProcessor, build_image_index, model_class_for_variant
from vit_t5_dsi.checkpoint.checkpoint_io import CODE_DIRECTORY, checkpoint_code_files

PACKAGE = os.path.dirname(CODE_DIRECTORY)
MAX_MODULE_LINES = 400
# what every checkpoint carries stays small: fewer modules than the 13 it carried before the folder existed
MAX_CHECKPOINT_MODULES = 12


def package_modules() -> dict[str, str]:
    """Dotted module name -> file, for every module of the package."""
    modules = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
                modules[dotted.removesuffix(".__init__")] = path
    return modules


def imports_of(module: str, path: str, modules: dict[str, str]) -> set[str]:
    """Package modules `module` imports anywhere in its file (function-level imports count: they are still edges)."""
    is_package = path.endswith("__init__.py")
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [stem] + [f"{stem}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        found |= {target for target in targets if target in modules and target != module}
    return found


def test_the_package_has_no_import_circles():
    modules = package_modules()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    # packages' __init__ re-exports are not dependencies of their submodules
    graph = {name: {t for t in targets if not name.startswith(t + ".")} for name, targets in graph.items()}
    done, stack = set(), []

    def visit(name):
        if name in stack:
            raise AssertionError("import circle: " + " -> ".join(stack[stack.index(name):] + [name]))
        if name in done:
            return
        stack.append(name)
        for target in sorted(graph[name]):
            visit(target)
        stack.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


def test_checkpoint_modules_import_only_each_other():
    """transformers' remote-code loader imports a checkpoint's modules from one flat folder."""
    for name in checkpoint_code_files():
        tree = ast.parse(open(os.path.join(CODE_DIRECTORY, name)).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and node.module, f"{name}: `from {'.' * node.level}{node.module or ''}`"
                assert f"{node.module}.py" in checkpoint_code_files(), f"{name} imports {node.module}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                absolute = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(m and m.split(".")[0] == "vit_t5_dsi" for m in absolute if not getattr(node, "level", 0)), name


def test_no_module_is_longer_than_the_limit():
    long = {os.path.relpath(path, PACKAGE): n for path in package_modules().values()
            if (n := sum(1 for _ in open(path))) > MAX_MODULE_LINES}
    assert long == {}


def save_tiny_checkpoint(folder, tokenizer, variant: str) -> None:
    model = model_class_for_variant(variant)(tiny_config(variant))
    model.image_index = build_image_index([f"img{i}" for i in range(6)], tokenizer, "naive")
    if variant == "dual_encoder":
        with torch.no_grad():
            model.image_index.embeddings = model.encode_images(torch.rand(6, 3, 32, 32))
    model.save_pretrained(folder)
    ViTT5DSIProcessor.for_model(model.config, tokenizer).save_pretrained(folder)


VARIANTS = ["cross_attention", "codebook", "dual_encoder"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_checkpoint_carries_exactly_the_checkpoint_folder(tmp_path, tokenizer, variant):
    save_tiny_checkpoint(tmp_path, tokenizer, variant)
    carried = sorted(name for name in os.listdir(tmp_path) if name.endswith(".py"))
    assert carried == checkpoint_code_files()
    assert len(carried) <= MAX_CHECKPOINT_MODULES, f"a checkpoint carries {len(carried)} modules: {carried}"
    assert not {"semantic_ids.py", "residual_quantization.py", "trainer.py", "build.py"} & set(carried)


WITHOUT_THE_PACKAGE = """
import sys
for name in ("vit_t5_dsi", "timm", "sklearn"):
    sys.modules[name] = None  # importing these raises ImportError, as on a machine without them
from transformers import AutoConfig, pipeline
for path in sys.argv[1:]:
    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    search = pipeline("text-to-image-retrieval", model=path, trust_remote_code=True)
    hits = search("a red circle", top_k=3)
    keys = [hit["image_key"] for hit in hits]
    assert len(keys) == len(set(keys)) == 3 and all(k.startswith("img") for k in keys), hits
    print("OK", config.variant, type(search.model).__name__, type(search).__name__)
"""


def test_every_variant_and_its_pipeline_load_where_the_package_is_not_installed(tmp_path, tokenizer):
    folders = []
    for variant in VARIANTS:
        save_tiny_checkpoint(tmp_path / variant, tokenizer, variant)
        folders.append(str(tmp_path / variant))
    script = tmp_path / "load.py"
    script.write_text(WITHOUT_THE_PACKAGE)
    result = subprocess.run([sys.executable, str(script), *folders], capture_output=True, text=True, cwd=tmp_path,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout.split("\n")
    for variant in VARIANTS:
        assert any(line.startswith(f"OK {variant} ") and line.endswith("TextToImageRetrievalPipeline")
                   for line in printed), result.stdout
