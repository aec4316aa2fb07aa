"""Imports point down: no module of evomerge imports one of a higher layer (the layers of ARCHITECTURE.md).

Every import counts: module-level, inside functions, under ``if TYPE_CHECKING:``, relative or absolute.
Lazy registry entries (``"package.module:attr"`` strings) are not imports and are not checked.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "evomerge"

#: ``(importing module, imported module) -> reason`` for imports allowed against the layers. Empty: none.
EXEMPT: dict[tuple[str, str], str] = {}


def read_layers(text: str) -> dict[str, int]:
    """Component -> layer from the ```` ```layers ```` block (lines ``N name name …``)."""
    block = re.search(r"```layers\n(.*?)```", text, re.S)
    assert block, "ARCHITECTURE.md has no ```layers block"
    layers: dict[str, int] = {}
    for line in block.group(1).strip().splitlines():
        number, *names = line.split()
        for name in names:
            assert name not in layers, f"{name} is listed in two layers"
            layers[name] = int(number)
    return layers


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, module: str, *, is_package: bool = False) -> list[str]:
    """Every evomerge module ``source`` imports, anywhere in the file."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from evomerge import recipe`` imports the module evomerge.recipe
            found += [f"{base}.{a.name}" for a in node.names] if base == "evomerge" else [base]
    return [name for name in found if name == "evomerge" or name.startswith("evomerge.")]


def component(module: str) -> str:
    """The entry of the layers that ``module`` belongs to: the longest listed prefix (``testing.runs`` before
    ``testing``), else its top-level module or subpackage."""
    parts = module.split(".")[1:] or ["evomerge"]
    for k in range(len(parts), 0, -1):
        if ".".join(parts[:k]) in LAYERS:
            return ".".join(parts[:k])
    return parts[0]


LAYERS = read_layers((ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8"))
MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_part_of_the_package_has_a_layer() -> None:
    parts = {component(module_name(p)) for p in MODULES}
    assert not parts - set(LAYERS), f"place these in ARCHITECTURE.md's layers: {sorted(parts - set(LAYERS))}"
    assert not set(LAYERS) - parts, f"ARCHITECTURE.md lists what does not exist: {sorted(set(LAYERS) - parts)}"


def test_no_module_imports_a_higher_layer() -> None:
    bad = []
    for path in MODULES:
        module = module_name(path)
        own = LAYERS[component(module)]
        for imported in imports_of(path.read_text(encoding="utf-8"), module, is_package=path.name == "__init__.py"):
            theirs = LAYERS.get(component(imported))
            if theirs is not None and theirs > own and (module, imported) not in EXEMPT:
                bad.append(f"{module} (layer {own}) imports {imported} (layer {theirs})")
    assert not bad, "imports that point up:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    ("source", "module", "expected"),
    [
        ("def f():\n    from evomerge.driver.run import load_run\n", "evomerge.results", ["evomerge.driver.run"]),
        ("if TYPE_CHECKING:\n    import evomerge.cli\n", "evomerge.recipe", ["evomerge.cli"]),
        ("from evomerge import recipe, errors\n", "evomerge.io.arch", ["evomerge.recipe", "evomerge.errors"]),
        ("from ..scoring import base\nfrom . import pool\n", "evomerge.driver.run",
         ["evomerge.scoring", "evomerge.driver"]),
        ("import numpy\nfrom typing import Any\n", "evomerge.rng", []),
    ],
)
def test_imports_are_found_wherever_they_stand(source: str, module: str, expected: list[str]) -> None:
    assert imports_of(source, module) == expected
