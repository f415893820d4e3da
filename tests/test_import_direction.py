"""The sandbox package never imports runnerd: it must stay usable and auditable on its own."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_sandbox_imports_nothing_from_runnerd() -> None:
    offenders = []
    for path in sorted((ROOT / "sandbox").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "runnerd"]
    assert offenders == []


def test_child_path_stays_auditable() -> None:
    """The code a child runs before customer code (child.py and its layers) stays small.

    cgroups.py is left out: it runs only in the zygote, around clone(2)."""
    layers = [p for p in (ROOT / "sandbox" / "layers").glob("*.py") if p.name != "cgroups.py"]
    files = [ROOT / "sandbox" / "child.py", *sorted(layers)]
    total = sum(len(path.read_text().splitlines()) for path in files)
    assert total < 600, f"the child path grew to {total} lines"


def test_the_forked_js_child_path_stays_auditable() -> None:
    """The node zygote's C half (the fork and the same recipe, in C) and the JavaScript that
    runs in the child before the step's code stay small too."""
    runtimes = ROOT / "sandbox" / "runtimes"
    files = [runtimes / "node_fork.c", runtimes / "node_zygote.cjs", runtimes / "step_runner.cjs"]
    total = sum(len(path.read_text().splitlines()) for path in files)
    assert total < 750, f"the forked JS child path grew to {total} lines"


def test_the_c_recipe_names_the_layers_in_the_python_order() -> None:
    """node_fork.c numbers the layers by their place in ALL_LAYERS (the recipe's bit mask)."""
    from sandbox.layers import ALL_LAYERS

    source = (ROOT / "sandbox" / "runtimes" / "node_fork.c").read_text()
    block = source.split("LAYER_NAMES[] = {", 1)[1].split("};", 1)[0]
    names = tuple(part.strip().strip('"') for part in block.split(",") if part.strip())
    assert names == ALL_LAYERS
