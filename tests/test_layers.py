"""The layer table of DESIGN.md, enforced: every ``kvfactory.*`` import must point down.

The checker parses every module under ``src/kvfactory`` with ``ast`` (nothing is imported)
and collects absolute, relative, function-level and ``TYPE_CHECKING`` imports plus
``importlib.import_module("kvfactory...")`` calls. ``from pkg import name`` counts as an
import of ``pkg.name`` when that is a module. A module outside every layer fails too, so a
new top-level module must be given a place in the table below. The same imports must form
no cycle between modules, however lazily either side imports the other.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

BASE = (
    "kvfactory._types",
    "kvfactory.errors",
    "kvfactory.extras",
    "kvfactory.config",
    "kvfactory.server_secret",
    "kvfactory.private_files",
    "kvfactory.stats",  # the one ``percentile`` of bench, report and the planner
    "kvfactory.cli_support",  # ``fail``: the one error line every command group prints
)
TELEMETRY = ("kvfactory.telemetry",)
STORE = ("kvfactory.store",)
POLICY_SIDE_OF_STORE = (
    "kvfactory.store.policy",
    "kvfactory.store.eviction",
    "kvfactory.store.admission",
    "kvfactory.store.cost",
    "kvfactory.store.keys",
    "kvfactory.store.tiers.base",  # ``TransferCost``, which the cost model prices
)

LAYER_OF_PREFIX: dict[str, str] = {
    "kvfactory": "base",  # the package ``__init__`` itself
    **dict.fromkeys(BASE, "base"),
    "kvfactory.telemetry": "telemetry",
    "kvfactory.store": "store",
    "kvfactory.engines": "engines",
    "kvfactory.sessions": "sessions",
    "kvfactory.gateway": "gateway",
    "kvfactory.planner": "planner",
    "kvfactory.bench": "bench",
    "kvfactory.testing": "testing",  # test doubles: nothing in src imports them
    "kvfactory.cli": "cli",
    "kvfactory.__main__": "cli",
}
"""Which layer a module belongs to: the longest matching prefix wins."""

ALLOWED: dict[str, tuple[str, ...] | None] = {
    "base": ("kvfactory", *BASE),
    "telemetry": ("kvfactory", *BASE, *TELEMETRY),
    "store": ("kvfactory", *BASE, *TELEMETRY, *STORE),
    "engines": ("kvfactory", *BASE, *TELEMETRY, *STORE, "kvfactory.engines"),
    "sessions": ("kvfactory", *BASE, *TELEMETRY, *STORE, "kvfactory.sessions"),
    "gateway": (
        "kvfactory",
        *BASE,
        *TELEMETRY,
        "kvfactory.sessions",
        "kvfactory.engines.base",
        "kvfactory.gateway",
    ),
    "planner": ("kvfactory", *BASE, *POLICY_SIDE_OF_STORE, "kvfactory.planner"),
    "bench": ("kvfactory", *BASE, *TELEMETRY, "kvfactory.planner", "kvfactory.bench"),
    "testing": ("kvfactory", *BASE, "kvfactory.engines.base", "kvfactory.testing"),
    "cli": None,  # anything
}
"""Import targets each layer may use (a target matches a prefix exactly or as a parent)."""


@dataclass(frozen=True, order=True)
class Violation:
    module: str
    line: int
    target: str
    why: str


def _matches(target: str, prefix: str) -> bool:
    if prefix == "kvfactory":  # the bare package, not everything below it
        return target == "kvfactory"
    return target == prefix or target.startswith(prefix + ".")


def layer_of(module: str) -> str | None:
    if module == "kvfactory":
        return LAYER_OF_PREFIX["kvfactory"]
    prefixes = [p for p in LAYER_OF_PREFIX if p != "kvfactory" and _matches(module, p)]
    return LAYER_OF_PREFIX[max(prefixes, key=len)] if prefixes else None


def discover(root: Path) -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is_package) for every ``.py`` under ``root/kvfactory``."""
    modules = {}
    for path in sorted((root / "kvfactory").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        modules[".".join(parts)] = (path, is_package)
    return modules


def _resolve_relative(package: str, level: int, module: str | None) -> str:
    parts = package.split(".")
    if level > 1:
        parts = parts[: len(parts) - (level - 1)]
    base = ".".join(parts)
    return f"{base}.{module}" if module else base


def imports_of(module: str, path: Path, is_package: bool, known: set[str]) -> list[tuple[int, str]]:
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = (
                _resolve_relative(package, node.level, node.module)
                if node.level
                else node.module or ""
            )
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.append((node.lineno, candidate if candidate in known else base))
        elif isinstance(node, ast.Call):
            name = getattr(node.func, "attr", None) or getattr(node.func, "id", None)
            if (
                name in ("import_module", "__import__")
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                found.append((node.lineno, node.args[0].value))
    return [(line, t) for line, t in found if t == "kvfactory" or t.startswith("kvfactory.")]


def check_layers(root: Path) -> list[Violation]:
    modules = discover(root)
    known = set(modules)
    violations = []
    for module, (path, is_package) in modules.items():
        layer = layer_of(module)
        if layer is None:
            violations.append(Violation(module, 0, "", "module is in no layer of the table"))
            continue
        allowed = ALLOWED[layer]
        if allowed is None:
            continue
        for line, target in imports_of(module, path, is_package, known):
            if not any(_matches(target, prefix) for prefix in allowed):
                violations.append(
                    Violation(module, line, target, f"layer '{layer}' may not import it")
                )
    return sorted(violations)


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package modules it imports (any kind of import the checker sees).

    A target that is not itself a module (``from pkg.mod import name``) counts as the
    longest known module it names. A parent package is not an edge of its submodules:
    Python runs a package's ``__init__`` before them, which is no cycle.
    """
    modules = discover(root)
    known = set(modules)

    def owner(target: str) -> str:
        while target and target not in known:
            target = target.rpartition(".")[0]
        return target

    return {
        module: {owner(t) for _, t in imports_of(module, path, is_package, known)} - {module, ""}
        for module, (path, is_package) in modules.items()
    }


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every group of modules that import each other, directly or not (Tarjan's strongly
    connected components of more than one module), each sorted.

    A cycle works only while each side imports the other lazily (``TYPE_CHECKING``, inside
    a function) and breaks when someone moves an import to the top, so none is allowed.
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # recursion depth is bounded by the package's size
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(cycles)


def test_the_package_has_no_import_cycle() -> None:
    cycles = find_cycles(import_graph(SRC))
    assert not cycles, "\n".join(" <-> ".join(group) for group in cycles)


def test_the_cycle_check_flags_synthetic_cycles(tmp_path: Path) -> None:
    files = {
        "kvfactory/__init__.py": "",
        "kvfactory/gateway/__init__.py": "from kvfactory.gateway.app import create\n",  # fine
        "kvfactory/gateway/app.py": "from kvfactory.gateway.routes import install\n",
        "kvfactory/gateway/routes.py": (  # back to app, hidden from runtime: still a cycle
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from kvfactory.gateway.app import Gateway\n"
        ),
        "kvfactory/store/__init__.py": "",
        "kvfactory/store/a.py": "from . import b\n",
        "kvfactory/store/b.py": "def f():\n    from kvfactory.store.c import g\n",
        "kvfactory/store/c.py": "import kvfactory.store.a\n",  # a -> b -> c -> a
        "kvfactory/store/d.py": "from kvfactory.store.a import x\n",  # into a cycle: fine
    }
    for relative, text in files.items():
        _write(tmp_path, relative, text)

    assert find_cycles(import_graph(tmp_path)) == [
        ["kvfactory.gateway.app", "kvfactory.gateway.routes"],
        ["kvfactory.store.a", "kvfactory.store.b", "kvfactory.store.c"],
    ]


def test_the_package_respects_its_layers() -> None:
    violations = check_layers(SRC)
    assert not violations, "\n".join(
        f"{v.module}:{v.line} imports {v.target or '-'}: {v.why}" for v in violations
    )


def test_the_checker_sees_every_module() -> None:
    modules = discover(SRC)
    assert {"kvfactory", "kvfactory.errors", "kvfactory.store.keys"} <= set(modules)
    assert all(layer_of(name) is not None for name in modules)


def _write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def test_the_checker_flags_synthetic_violations(tmp_path: Path) -> None:
    files = {
        "kvfactory/__init__.py": "from kvfactory.errors import E\n",
        "kvfactory/errors.py": "",
        "kvfactory/config.py": "from kvfactory.errors import E\n",
        "kvfactory/_types.py": "from kvfactory.telemetry import metrics\n",  # up: bad
        "kvfactory/telemetry/__init__.py": "",
        "kvfactory/telemetry/metrics.py": "from .. import errors\n",
        "kvfactory/store/__init__.py": "from .keys import K\n",
        "kvfactory/store/keys.py": "from ..engines import hf\n",  # relative, up: bad
        "kvfactory/store/cost.py": "def f():\n    import kvfactory.gateway.app\n",  # nested: bad
        "kvfactory/store/policy.py": "from . import cost\n",
        "kvfactory/engines/__init__.py": "",
        "kvfactory/engines/base.py": "from kvfactory.store import keys\n",
        "kvfactory/engines/hf.py": "from kvfactory.store.keys import K\n",
        "kvfactory/gateway/__init__.py": "",
        "kvfactory/gateway/app.py": (
            "from typing import TYPE_CHECKING\n"
            "from kvfactory.engines import base\n"  # fine: engines.base only
            "if TYPE_CHECKING:\n    from kvfactory.engines.hf import H\n"  # bad
        ),
        "kvfactory/planner/__init__.py": "from kvfactory.store import policy\n",  # fine
        "kvfactory/planner/sim.py": (
            "import importlib\nimportlib.import_module('kvfactory.store.context_store')\n"
        ),  # dynamic: bad
        "kvfactory/cli.py": "import kvfactory.gateway.app\nimport kvfactory.engines.hf\n",
        "kvfactory/misc.py": "",  # in no layer: bad
    }
    for relative, text in files.items():
        _write(tmp_path, relative, text)

    found = {(v.module, v.target) for v in check_layers(tmp_path)}

    assert found == {
        ("kvfactory._types", "kvfactory.telemetry.metrics"),
        ("kvfactory.store.keys", "kvfactory.engines.hf"),
        ("kvfactory.store.cost", "kvfactory.gateway.app"),
        ("kvfactory.gateway.app", "kvfactory.engines.hf"),
        ("kvfactory.planner.sim", "kvfactory.store.context_store"),
        ("kvfactory.misc", ""),
    }
