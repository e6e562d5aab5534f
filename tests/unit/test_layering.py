"""The code's layout rules, checked on the source: what may import what, no import circles,
and database differences named only where they are decided."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("domain", "worker", "scheduler", "api", "conveyor")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in it (functions and TYPE_CHECKING included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _first_party(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        targets = {_first_party(name) for name in _imports(path)} - {None, module}
        # a package's __init__ is not a dependency of the modules inside it
        graph[module] = {t for t in targets if t and not module.startswith(f"{t}.")}
    return graph


def test_no_module_imports_one_that_imports_it_back() -> None:
    graph, cycles = _graph(), []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert cycles == []


@pytest.mark.parametrize("outer", ["worker", "scheduler", "api", "conveyor"])
def test_domain_imports_no_outer_package(outer: str) -> None:
    offenders = [
        module
        for module, path in MODULES.items()
        if module.startswith("domain")
        and any(name == outer or name.startswith(f"{outer}.") for name in _imports(path))
    ]
    assert offenders == []


def _is_postgres_adapter(module: str) -> bool:
    return module.startswith("domain.db.") or module.endswith("_pg")


def test_the_driver_is_used_directly_only_by_the_postgresql_adapters() -> None:
    """psycopg is imported in domain/ only by domain/db/ and the *_pg modules, and never by
    the API or the CLI, which reach the database through domain/."""
    offenders = [
        module
        for module, path in MODULES.items()
        if any(name == "psycopg" or name.startswith("psycopg.") for name in _imports(path))
        and (
            module.startswith(("api", "conveyor"))
            or (module.startswith("domain") and not _is_postgres_adapter(module))
        )
    ]
    assert offenders == []


def test_only_the_adapters_and_the_storage_choice_name_a_database() -> None:
    """Call sites ask domain/db/capabilities.py what the database can do; naming one (its
    dialect) is for domain/db/, the *_pg adapters and domain/storage.py."""
    allowed = {"domain.storage"}
    offenders = [
        module
        for module, path in MODULES.items()
        if re.search(r"\bdialect\b", path.read_text())
        and not _is_postgres_adapter(module)
        and module not in allowed
    ]
    assert offenders == []
