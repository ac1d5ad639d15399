"""The package's shape: imports flow one way (no cycle anywhere, imports inside functions
counted), and the README's Architecture section lists exactly the modules that exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hpsearch"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_package(name: str, known: dict[str, Path]) -> bool:
    return known[name].name == "__init__.py"


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """hpsearch modules that ``name`` imports anywhere in its body (functions included).

    Importing ``a.b.c`` runs ``a.b``'s ``__init__`` too, so a package above the target is an
    edge as well, unless it is a package the importer itself lives in (already running).
    """
    out: set[str] = set()
    package = name if is_package(name, known) else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]
        for target in targets:
            if not target.startswith("hpsearch"):
                continue
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                candidate = ".".join(parts[:i])
                own_ancestor = name == candidate or name.startswith(candidate + ".")
                if candidate in known and not own_ancestor:
                    out.add(candidate)
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(name, path, known) for name, path in known.items()}


def test_the_package_has_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path: Path) -> None:
    # The checker itself must be able to fail: a cycle hidden inside a function counts.
    pkg = tmp_path / "hpsearch"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from hpsearch.b import g\n")
    (pkg / "b.py").write_text("def g():\n    from hpsearch import a\n    return a\n")
    known = {module_name_under(tmp_path, p): p for p in pkg.rglob("*.py")}
    graph = {n: imported(n, p, known) for n, p in known.items()}
    assert find_cycle(graph) in (["hpsearch.a", "hpsearch.b", "hpsearch.a"],
                                 ["hpsearch.b", "hpsearch.a", "hpsearch.b"])


def module_name_under(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_module_dodges_imports_with_a_module_getattr() -> None:
    for name, path in modules().items():
        tree = ast.parse(path.read_text())
        names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert "__getattr__" not in names, name


def readme_architecture() -> set[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"`(hpsearch/\w+(?:\.py|/))`", section))


def test_readme_architecture_section_matches_the_tree() -> None:
    listed = readme_architecture()
    if not listed:
        pytest.fail("README.md has no Architecture section listing the modules")
    on_disk = {p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*.py")
               if p.name != "__init__.py" and p.parent == PACKAGE}
    on_disk |= {p.relative_to(ROOT).as_posix() + "/" for p in PACKAGE.iterdir()
                if p.is_dir() and (p / "__init__.py").exists()}
    assert listed == on_disk, (sorted(listed - on_disk), sorted(on_disk - listed))
