"""The shape the tools can check: every import arrow points down, and no module grows without a reason.

The import graph is read from the source with ``ast``: every ``import`` statement counts, those
inside functions and ``if TYPE_CHECKING:`` blocks included, so a cycle cannot hide in a lazy import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = ("chronos", "chronos_jupyter")
#: Modules allowed past ~450 lines because they are one job each.
ONE_JOB = {
    "chronos/scheduler.py": "the planner",
    "chronos/engine.py": "the composition root: every lease operation, each policy a hook into chronos.policy",
    "chronos/config.py": "the configuration schema: every key, its parser, its file and line",
    "chronos/ledger.py": "the one module that speaks SQL: the schema, its migrations and every query",
    "chronos/devices/simulated.py": "the simulated GPU backend: memory and SM use shared through one file",
    "chronos_jupyter/provisioner.py": "jupyter_client's provisioner hooks: a kernel's life inside its lease",
}
MAX_LINES = 480


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports, wherever in the file the import stands (ruff bans
    relative imports, so every import names its module in full)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            targets = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    graph = {name: _imports(name, path, known) for name, path in modules.items()}
    # A package's ``__init__`` runs before any of its modules: importing ``a.b`` imports ``a``. That is
    # the interpreter's arrow, not the author's, so parents are not counted as imports of children.
    return {name: {t for t in targets if not name.startswith(t + ".")} for name, targets in graph.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_is_read_from_the_source() -> None:
    graph = _graph()
    assert "chronos.engine" in graph["chronos.api"]
    assert "chronos.enforce.activation" in graph["chronos.engine"]  # a function-level import is an arrow


def test_a_planted_cycle_is_found() -> None:
    graph = _graph()
    graph["chronos.model"] = {*graph["chronos.model"], "chronos.engine"}
    assert _cycle(graph) is not None


def test_no_import_cycles() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, " -> ".join(cycle or [])


@pytest.mark.parametrize("low, high", [
    ("chronos.model", "chronos.engine"),
    ("chronos.spellings", "chronos.model"),  # the parser's vocabulary stays below the records
    ("chronos.lease", "chronos.engine"),
    ("chronos.enforce.watchdog", "chronos.engine"),
    ("chronos.enforce.caps", "chronos.devices"),
    ("chronos.accounting", "chronos.engine"),
    ("chronos.devices", "chronos.engine"),
])
def test_low_layers_do_not_reach_up(low: str, high: str) -> None:
    graph = _graph()
    seen: set[str] = set()
    pending = [low]
    while pending:
        node = pending.pop()
        for nxt in graph.get(node, ()):
            if nxt not in seen:
                seen.add(nxt)
                pending.append(nxt)
    assert high not in seen, f"{low} reaches {high}"


def test_the_core_never_imports_the_jupyter_layer() -> None:
    graph = _graph()
    offenders = {name for name, targets in graph.items() if name.startswith("chronos.")
                 and any(t.startswith("chronos_jupyter") for t in targets)}
    assert not offenders


def test_no_module_grows_past_one_job() -> None:
    long = {str(p.relative_to(ROOT)): n for p in _modules().values()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert set(long) <= set(ONE_JOB), long
