"""The package tree is the import tree, one way: each layer imports only the layers below it, and
no module imports another package's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Folder of each package of the import tree (as pyproject.toml's package-dir maps them).
PACKAGE_DIRS = {
    "fedsilo": ROOT / "fedsilo",
    "fedsilo.v1": ROOT / "proto" / "fedsilo" / "v1",
    "fedsilo.privacy": ROOT / "privacy",
    "fedsilo.models": ROOT / "models",
    "fedsilo.coordinator": ROOT / "coordinator",
    "fedsilo.silo_agent": ROOT / "silo_agent",
}

#: Layer -> the layers it may import (besides itself and the root package's ``__version__``).
ALLOWED = {
    "v1": set(),
    "core": {"v1"},
    "privacy": {"core"},
    "models": {"core", "privacy"},
    "coordinator": {"v1", "core", "privacy"},
    "silo_agent": {"v1", "core", "privacy", "models", "coordinator"},
    "cli": {"v1", "core", "privacy", "models", "coordinator", "silo_agent"},
}


def _modules() -> dict[str, Path]:
    """Every module of the package, by dotted name (nested folders of a package dir included)."""
    out: dict[str, Path] = {}
    for pkg, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            if pkg == "fedsilo" and parts[:1] not in (["core"], ["cli"], ["__main__"], []):
                continue
            out.setdefault(name, path)
    return out


MODULES = _modules()


def layer_of(module: str) -> str | None:
    """The layer of a ``fedsilo`` module (None for the root package itself)."""
    parts = module.split(".")
    if parts[0] != "fedsilo":
        return None
    if len(parts) == 1 or parts[1] == "__main__":
        return "cli" if parts[-1] == "__main__" else None
    return parts[1]


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, names, line) for every ``fedsilo`` import of a file, lazy ones inside functions included."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("fedsilo"):
            out.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            out.extend((a.name, [], node.lineno) for a in node.names if a.name.startswith("fedsilo"))
    return out


def test_every_layer_folder_is_seen() -> None:
    layers = {layer_of(m) for m in MODULES}
    assert set(ALLOWED) <= layers | {None}, f"no modules found for {set(ALLOWED) - layers}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_layers(module: str) -> None:
    mine = layer_of(module)
    bad = []
    for target, names, line in _imports(MODULES[module]):
        theirs = layer_of(target)
        if theirs is None:  # the root package: only its version
            if set(names) - {"__version__"}:
                bad.append(f"line {line}: from {target} import {names}")
            continue
        if mine is None or theirs == mine:
            continue
        if theirs not in ALLOWED[mine]:
            bad.append(f"line {line}: {mine} imports {target} ({theirs} is not below {mine})")
    assert not bad, f"{module}: " + "; ".join(bad)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_names_of_another_package(module: str) -> None:
    mine = ".".join(module.split(".")[:2])
    bad = []
    for target, names, line in _imports(MODULES[module]):
        theirs = ".".join(target.split(".")[:2])
        if theirs == mine:
            continue
        private_module = any(p.startswith("_") and not p.startswith("__") for p in target.split("."))
        private_names = [n for n in names if n.startswith("_") and not n.startswith("__")]
        if private_module or private_names:
            bad.append(f"line {line}: from {target} import {names}")
    assert not bad, f"{module} uses private names of another package: " + "; ".join(bad)


@pytest.mark.parametrize("module", sorted(m for m, p in MODULES.items() if p.name == "__init__.py") +
                         sorted(m for m, p in MODULES.items() if p.name != "__init__.py" and "_pb2" not in m))
def test_every_module_has_a_real_docstring(module: str) -> None:
    doc = ast.get_docstring(ast.parse(MODULES[module].read_text(encoding="utf-8")))
    assert doc and doc.strip().lower().rstrip(".") not in ("placeholder", "todo", ""), f"{module}: no real docstring"
    assert len(doc.splitlines()[0]) > 20, f"{module}: its docstring's first line says too little: {doc.splitlines()[0]!r}"


def test_pyproject_lists_every_package_folder() -> None:
    """Every folder with an ``__init__.py`` below a mapped package dir is a listed package (a missing one
    would be left out of the wheel; a listed one without a folder breaks the install)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for pkg, folder in PACKAGE_DIRS.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder).parts
            if pkg == "fedsilo" and rel[:1] not in ((), ("core",), ("cli",)):
                continue
            found.add(".".join([pkg, *rel]))
    assert listed == found, f"listed but missing: {sorted(listed - found)}; present but unlisted: {sorted(found - listed)}"
