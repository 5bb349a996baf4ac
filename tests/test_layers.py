"""The package layout: packages by role, each above what it uses; no import runs back up a layer."""

from __future__ import annotations

import ast
from pathlib import Path

import gren

# From the ground up; a module may import its own layer and the ones before it.
LAYERS = ["core", "hashing", "lungs", "models", "metrics", "methods", "data", "train", "eval", "commands", "cli"]


def imports_by_layer():
    root = Path(gren.__file__).parent
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        layer = parts[0].removesuffix(".py")
        if layer == "__init__":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                if name and name.startswith("gren."):
                    yield "/".join(parts), node.lineno, layer, name.split(".")[1]


def test_every_module_is_in_a_layer():
    unknown = {layer for _, _, layer, _ in imports_by_layer() if layer not in LAYERS}
    assert not unknown, f"modules outside the layer list: {unknown}"


def test_no_import_runs_back_up_a_layer():
    upward = [f"{where}:{line} ({layer} imports {target})" for where, line, layer, target in imports_by_layer()
              if target in LAYERS and LAYERS.index(target) > LAYERS.index(layer)]
    assert not upward, "\n".join(upward)
