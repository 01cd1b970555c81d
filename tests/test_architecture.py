"""The layout docs/architecture.md draws: packages are layers, every import (lazy ones included) points down
or stays inside its own package, the root holds only what every layer uses, and modules stay readable."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lmtrain"

# Lowest first: a module may import from its own layer's package or from any layer below it.
LAYERS = [
    {"lmtrain", "errors", "files"},  # `lmtrain` itself: __version__
    {"console"},
    {"config"},
    {"data"},
    {"model"},
    {"hf"},
    {"distributed"},
    {"runs"},
    {"training"},
    {"commands"},
    {"cli"},
    {"__main__"},
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
ROOT_MODULES = {"cli.py", "console.py", "errors.py", "files.py"}  # besides __init__.py and __main__.py
MAX_LINES = 400


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def unit(dotted: str) -> str:
    """The layer unit of `lmtrain.x.y`: its package or root module `x` (`lmtrain` for the package itself)."""
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else "lmtrain"


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, lmtrain.module) for every import of lmtrain in the file, at any depth (lazy imports count)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lmtrain":
            names = [node.module] if node.module != "lmtrain" else [  # a submodule, or an attribute of lmtrain
                f"lmtrain.{a.name}" if (PACKAGE / a.name).is_dir() or (PACKAGE / f"{a.name}.py").is_file()
                else "lmtrain" for a in node.names]
            found += [(node.lineno, name) for name in names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "lmtrain"]
    return found


def test_every_module_belongs_to_a_layer():
    units = {unit("lmtrain." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts)) for p in modules()}
    assert units - {"__init__"} <= set(LAYER), f"add these to LAYERS and docs/architecture.md: {units - set(LAYER)}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    own = unit("lmtrain." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts))
    own = "lmtrain" if own == "__init__" else own
    upward = [f"line {line}: {name}" for line, name in imports(path)
              if unit(name) != own and LAYER[unit(name)] >= LAYER[own]]
    assert not upward, f"{path.relative_to(PACKAGE)} ({own}) imports from its own layer or above: {upward}"


def test_the_root_holds_only_what_every_layer_uses():
    loose = {p.name for p in PACKAGE.glob("*.py")} - {"__init__.py", "__main__.py"}
    assert loose <= ROOT_MODULES, f"modules at the root of lmtrain/ that belong in a package: {loose - ROOT_MODULES}"


def test_no_module_grows_past_400_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these by concern: {long}"
