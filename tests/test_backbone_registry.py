"""The backbone registry, entry by entry, and the import graph of the core packages (no circles).

Every entry of ``BACKBONES`` is built or loaded through its own loader: tiny variants are built
at non-default ``features.tiny`` sizes and must have them; published ones are loaded from a
missing local checkpoint and must say which. Imports inside the core packages run one way: the
graph of every ``mirage`` import (module level or not) among them has no cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from import_graph import find_cycle
import torch

from mirage.config import load_config
from mirage.errors import ModelLoadError
from mirage.features.backbone import BACKBONES, load_backbone
from mirage.features.families import FAMILIES
from mirage.features.pretrained import load_pretrained
from mirage.features.tiny import build_tiny

PLATFORM = Path(__file__).resolve().parents[1] / "platform"
CORE = ("data", "features", "model", "train")
"""Packages whose imports must form no cycle (with their leaves ``mirage.config`` and ``mirage.errors``)."""
TINY_SIZES = {"n_layers": 2, "hidden": 32, "heads": 2, "kv_heads": 1}
"""Non-default tiny sizes: a built backbone must carry these, not the defaults."""


@pytest.fixture(scope="module")
def fcfg():
    return load_config("demo", [f"features.tiny.{k}={v}" for k, v in TINY_SIZES.items()]).features


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_entry_loads_through_its_loader(fcfg, name, tmp_path):
    entry = BACKBONES[name]
    family = FAMILIES[entry.family]
    assert entry.name == name
    assert BACKBONES[entry.tiny].builds_locally and BACKBONES[entry.tiny].family == entry.family
    if entry.builds_locally:
        assert entry.loader is build_tiny
        bb = load_backbone(fcfg.model_copy(update={"backbone": name}))
        assert (bb.name, bb.family) == (name, entry.family)
        assert type(bb.model).__name__ == family.thinker_class
        assert (bb.n_layers, bb.dim) == (TINY_SIZES["n_layers"] + 1, TINY_SIZES["hidden"])
        ids = bb.processor.tokenizer("hello ross", return_tensors="pt")["input_ids"]  # (1, S)
        with torch.inference_mode():
            hidden = bb.model(input_ids=ids, **bb.forward_kwargs(False)).hidden_states
        assert len(hidden) == bb.n_layers  # embeddings + every decoder layer, as extraction stores them
        assert all(h.shape == (1, ids.shape[1], bb.dim) for h in hidden)
    else:
        assert entry.loader is load_pretrained
        assert entry.n_layers > 1 and entry.dim > 0
        missing = tmp_path / f"no-{name}"
        with pytest.raises(ModelLoadError, match=rf"features.model_id='{missing}'.*{entry.family}"):
            load_backbone(fcfg.model_copy(update={"backbone": name, "model_id": str(missing)}))


def test_importing_the_registry_builds_and_imports_nothing_heavy():
    code = ("import sys, mirage.features.backbone, mirage.features.store; "
            "print(sorted(m for m in ('torch', 'transformers', 'tokenizers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def _module_of(path: Path) -> str:
    parts = path.relative_to(PLATFORM).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, known: set[str]) -> set[str]:
    """Modules of ``known`` that ``path`` imports anywhere (module level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out |= {n for n in names if n in known}
    return out


def _core_graph() -> dict[str, set[str]]:
    files = [p for pkg in CORE for p in (PLATFORM / "mirage" / pkg).rglob("*.py")]
    files += [PLATFORM / "mirage" / "config.py", PLATFORM / "mirage" / "errors.py"]
    known = {_module_of(p) for p in files}
    return {_module_of(p): _imports(p, known) - {_module_of(p)} for p in files}


def test_core_imports_form_no_cycle():
    graph = _core_graph()
    assert {"mirage.features.backbone", "mirage.features.tiny", "mirage.train.data"} <= set(graph)
    assert "mirage.features.tiny" in graph["mirage.features.backbone"]  # the registry names its loaders
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle among the core packages: {' -> '.join(cycle)}"
