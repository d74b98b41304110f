"""The import direction, read from the source: a module imports only layers below its own.

    chestxpert (CLI, demo) → results → sweeps → trainable → datasets → cluster

`make lint` runs this file; `python -m tests.test_layers [ROOT]` checks another checkout
(e.g. an older commit) and prints every violation.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Lowest first; the app package `chestxpert` is above every part.
LAYERS = ("cluster", "datasets", "trainable", "sweeps", "results", "chestxpert")
PARTS = LAYERS[:-1]


def layer_of_module(name: str) -> str | None:
    """The layer an absolute module name belongs to, or None for a third-party module.

    `chestxpert.sweeps.run` is `sweeps`; `chestxpert` and `chestxpert.cli` are the app; a
    bare part name (`datasets.reader`, as the tree spelled it before the namespace) is
    that part, so an old checkout can be checked too.
    """
    parts = name.split(".")
    if parts[0] == "chestxpert":
        return parts[1] if len(parts) > 1 and parts[1] in PARTS else "chestxpert"
    return parts[0] if parts[0] in PARTS else None


def imported_modules(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file, in functions too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name == "chestxpert":  # `from chestxpert import cli` imports chestxpert.cli
                found += [(node.lineno, f"{name}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, name))
    return found


def layer_violations(root: Path) -> list[str]:
    """`file:line: <layer> imports <module> (<layer>)` for every import of a higher layer."""
    problems = []
    for layer in LAYERS:
        folder = root / layer
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*.py")):
            relative = path.relative_to(root)
            package = ".".join(relative.parent.parts)
            for line, module in imported_modules(path, package):
                target = layer_of_module(module)
                if target is None or target == layer:
                    continue
                if LAYERS.index(target) > LAYERS.index(layer) or not module.startswith(
                    "chestxpert"
                ):
                    problems.append(f"{relative}:{line}: {layer} imports {module} ({target})")
    return problems


def test_no_module_imports_a_layer_above_its_own() -> None:
    problems = layer_violations(REPO)
    assert not problems, "imports against the layer order:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    ("layer", "source", "expected"),
    [
        ("cluster", "from chestxpert.sweeps.run import connect\n", "cluster imports"),
        ("datasets", "def f():\n    from chestxpert.trainable import train\n", "datasets imports"),
        ("sweeps", "from chestxpert import cli\n", "sweeps imports chestxpert.cli"),
        ("results", "import datasets.reader\n", "results imports datasets.reader"),
        ("trainable", "from chestxpert.datasets.reader import open_dataset\n", None),
        ("chestxpert", "from chestxpert.results.final import run_final\n", None),
    ],
    ids=["upward", "inside-a-function", "the-app", "bare-name", "downward", "app-uses-all"],
)
def test_the_check_catches_upward_and_bare_imports(
    tmp_path: Path, layer: str, source: str, expected: str | None
) -> None:
    (tmp_path / layer).mkdir()
    (tmp_path / layer / "module.py").write_text(source)
    problems = layer_violations(tmp_path)
    if expected is None:
        assert problems == []
    else:
        assert len(problems) == 1 and expected in problems[0], problems


if __name__ == "__main__":
    found = layer_violations(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO)
    print("\n".join(found) or "no import against the layer order")
    sys.exit(1 if found else 0)
