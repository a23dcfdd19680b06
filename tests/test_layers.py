"""The package's layers hold: Ray only in ``distributed/``, MLflow only in ``tracking/``, a core that
imports neither (nor the layers above it), and no import circle between modules.

Layers, bottom up: core (everything not named below) -> ``tracking/`` (MLflow) -> ``distributed/``
(Ray) -> ``pipeline/`` (orchestration) -> ``commands/``, ``cli``, ``__main__``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from import_graph import find_cycle

import mirage

PACKAGE = Path(mirage.__file__).resolve().parent
UPPER = ("tracking", "distributed", "pipeline", "commands", "cli", "__main__")
"""First path parts of the modules above the core."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _layer(module: str) -> str:
    head = module.split(".")[1] if "." in module else ""
    return head if head in UPPER else "core"


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, top_level_only: bool = False, module: str | None = None) -> list[tuple[str, int]]:
    """(imported module, line) of every import in a file (inside functions too, unless ``top_level_only``)."""
    module = module or _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: list[tuple[str, int]] = []

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                out.extend((a.name, node.lineno) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                out.append((base, node.lineno))
                out.extend((f"{base}.{a.name}", node.lineno) for a in node.names)  # submodules named in the list
            elif isinstance(node, ast.If) and _type_checking(node):
                continue
            elif top_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            else:
                visit([c for c in ast.iter_child_nodes(node) if isinstance(c, ast.stmt)])

    visit(ast.parse(path.read_text()).body)
    return out


def _offenders(rule, modules: dict[str, Path] = MODULES) -> list[str]:
    return [
        f"{modules[m].name if m not in MODULES else modules[m].relative_to(PACKAGE.parent)}:{line} imports {name}"
        for m in modules
        for name, line in _imports(modules[m], module=m)
        if rule(m, name)
    ]


def _is(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_the_rules_see_every_layer():
    layers = {_layer(m) for m in MODULES}
    assert {"core", "tracking", "distributed", "pipeline", "commands", "cli"} <= layers, layers


def test_ray_is_imported_only_in_distributed():
    bad = _offenders(lambda m, name: _is(name, "ray") and _layer(m) != "distributed")
    assert not bad, "Ray outside mirage.distributed:\n" + "\n".join(bad)


def test_mlflow_is_imported_only_in_tracking():
    bad = _offenders(lambda m, name: _is(name, "mlflow") and _layer(m) != "tracking")
    assert not bad, "MLflow outside mirage.tracking:\n" + "\n".join(bad)


def test_core_imports_no_layer_above_it():
    bad = _offenders(
        lambda m, name: _layer(m) == "core" and _is(name, "mirage") and _layer(name) != "core"
    )
    assert not bad, "core modules reaching up:\n" + "\n".join(bad)


def test_lower_layers_do_not_import_the_ones_above():
    order = ["core", "tracking", "distributed", "pipeline", "commands", "cli", "__main__"]
    bad = _offenders(
        lambda m, name: _is(name, "mirage.") and order.index(_layer(name)) > order.index(_layer(m))
        and not (_layer(m) in ("commands", "cli", "__main__") and _layer(name) in ("commands", "cli", "__main__"))
    )
    assert not bad, "imports that point up the layers:\n" + "\n".join(bad)


def test_module_level_imports_form_no_circle():
    graph = {
        m: {name for name, _ in _imports(MODULES[m], top_level_only=True) if name in MODULES and name != m}
        for m in MODULES
    }
    for m, deps in graph.items():  # importing a package's module runs the package's __init__ first
        deps |= {".".join(d.split(".")[:i]) for d in list(deps) for i in range(2, d.count(".") + 1)} & MODULES.keys()
        deps -= {m, *(".".join(m.split(".")[:i]) for i in range(1, m.count(".") + 1))}  # its own packages
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


BLOCK = """
import importlib, sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "mlflow"):
            raise ImportError(f"{name} is blocked: core modules must not import it")
        return None

sys.meta_path.insert(0, Block())
for name in sys.argv[1:]:
    importlib.import_module(name)
    assert not [m for m in sys.modules if m.split(".")[0] in ("ray", "mlflow")], name
print("ok", len(sys.argv) - 1)
"""


def test_every_core_module_imports_with_ray_and_mlflow_blocked():
    core = sorted(m for m in MODULES if _layer(m) == "core")
    assert len(core) > 40, core
    res = subprocess.run([sys.executable, "-c", BLOCK, *core], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split() == ["ok", str(len(core))]


def test_the_block_itself_stops_an_import_of_ray():
    res = subprocess.run(
        [sys.executable, "-c", BLOCK, "mirage.distributed.progress"], capture_output=True, text=True, timeout=300
    )
    assert res.returncode != 0 and "blocked" in res.stderr


@pytest.mark.parametrize("module", ["mirage.tracking", "mirage.distributed.cluster", "mirage.pipeline.ensemble"])
def test_rules_would_catch_a_stray_import(module, tmp_path):
    """A core file importing ``module`` (even inside a function) is reported."""
    probe = tmp_path / "probe.py"
    probe.write_text(f"def f():\n    import {module}\n")
    bad = _offenders(
        lambda m, name: _layer(m) == "core" and _is(name, "mirage") and _layer(name) != "core",
        {"mirage.probe": probe},
    )
    assert bad == [f"probe.py:2 imports {module}"], bad
