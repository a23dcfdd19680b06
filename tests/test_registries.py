"""Registries, each tested entry by entry: every command of ``mirage`` and every ridge baseline.

A new entry in :data:`mirage.commands.registry.COMMANDS` or :data:`mirage.baselines.BASELINES`
is picked up by these tests without editing them.
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mirage.baselines import BASELINES, fit_baseline
from mirage.cli import build_parser, main
from mirage.commands.registry import COMMANDS, Command

COMMON_FLAGS = ("--config", "--set", "--debug", "--help")


def _own_flags(cmd: Command) -> list[str]:
    """The option strings ``cmd.add_args`` declares, read from a parser of its own."""
    p = argparse.ArgumentParser(add_help=False)
    cmd.add_args(p)
    return [s for action in p._actions for s in action.option_strings]


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    return capsys.readouterr().out


def _squeeze(text: str) -> str:
    """``text`` without whitespace: argparse wraps help lines (also after hyphens)."""
    return "".join(text.split())


def _subcommands(parser: argparse.ArgumentParser, prefix: str = "") -> set[str]:
    """Every leaf subcommand of ``parser`` as space-separated words."""
    out: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                words = f"{prefix} {name}".strip()
                out |= _subcommands(sub, words) or {words}
    return out


# ------------------------------------------------------------------ commands


def test_the_parser_holds_exactly_the_registered_commands():
    names = [c.name for c in COMMANDS]
    assert len(set(names)) == len(names), names
    assert _subcommands(build_parser()) == set(names)


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: c.name.replace(" ", "-"))
def test_every_command_help_parses_and_names_its_flags(cmd, capsys):
    text = _help([*cmd.name.split(), "--help"], capsys)
    assert text.startswith(f"usage: mirage {cmd.name} "), text[:200]
    assert _squeeze(cmd.help) in _squeeze(text)  # the description, however argparse wraps it
    for flag in (*_own_flags(cmd), *COMMON_FLAGS):
        assert flag in text, f"`mirage {cmd.name} --help` does not name {flag}"


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: c.name.replace(" ", "-"))
def test_every_command_is_listed_by_its_group_help(cmd, capsys):
    words = cmd.name.split()
    text = _squeeze(_help([*words[:-1], "--help"], capsys))
    assert _squeeze(f"{words[-1]} {cmd.help}") in text


CLEAN_IMPORT = """
import sys
from mirage.commands.registry import COMMANDS
assert "mirage.cli" not in sys.modules, "the command registry imported the CLI"
from mirage.cli import build_parser
build_parser()
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"ray", "mlflow", "torch", "sklearn", "av"})
print(len(COMMANDS), *heavy)
"""


def test_building_the_parser_imports_no_heavy_library():
    """``mirage --help`` loads neither Ray, MLflow, torch, sklearn nor PyAV: commands import the pipeline when run."""
    out = subprocess.run([sys.executable, "-c", CLEAN_IMPORT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(len(COMMANDS))]


def _imported(path: Path) -> set[str]:
    """Every module an ``import`` in ``path`` names, inside functions too."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


BELOW_THE_PIPELINE = ("ray", "mlflow", "mirage.distributed", "mirage.tracking")


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: c.name.replace(" ", "-"))
def test_every_command_reaches_ray_and_mlflow_only_through_the_pipeline(cmd):
    path = Path(sys.modules[cmd.run.__module__].__file__)
    bad = sorted(n for n in _imported(path) if any(n == b or n.startswith(b + ".") for b in BELOW_THE_PIPELINE))
    assert not bad, f"{path.name} imports {bad}; expected calls into mirage.pipeline"


JOBS = sorted((Path(__file__).resolve().parents[1] / "jobs").glob("*.py"))


@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.name)
def test_every_job_script_only_calls_the_cli(job):
    assert _imported(job) == {"sys", "mirage.cli"}


# ------------------------------------------------------------------ baselines


def test_the_baseline_command_offers_exactly_the_registered_baselines(capsys):
    text = _squeeze(_help(["baseline", "--help"], capsys))
    assert "{" + ",".join(sorted(BASELINES)) + "}" in text
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["baseline", "--which", "no-such-baseline"])
    assert e.value.code == 2


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_every_baseline_is_chosen_by_the_cli(name):
    assert build_parser().parse_args(["baseline", "--which", name]).which == [name]
    assert BASELINES[name].name == name


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_every_baseline_recovers_the_planted_signal(name, train_cfg, synth_root):
    """Fit on the synthetic dataset: parcels driven by vision or text are predicted on held-out runs,
    parcels without a planted signal stay at chance."""
    from mirage.features.store import open_store

    cfg = train_cfg.with_overrides({"train.baseline.pca_components": 16})
    modality = np.array(json.loads((Path(synth_root) / "_truth" / "truth.json").read_text())["modality"])
    store = open_store(cfg.features)
    res = fit_baseline(cfg, name, store)
    assert res.layers == BASELINES[name].layers(cfg, store.n_layers)
    assert res.r.shape == (len(cfg.data.subjects), cfg.data.n_parcels)
    for m, (_, pca) in res.reducers.items():  # the registry's components, capped by the data's rank bound
        full = min(pca.n_features_in_, pca.n_samples_)
        assert pca.n_components_ == min(BASELINES[name].components(cfg.train.baseline, m) or full, full), m
    planted = np.nanmean(res.r[:, np.isin(modality, ["vision", "text"])])
    chance = np.nanmean(res.r[:, modality == "none"])
    assert abs(chance) < 0.1, chance
    assert planted > chance + 0.2, (planted, chance)


def test_an_unknown_baseline_is_refused_with_the_known_names(train_cfg):
    from mirage.errors import DataError

    with pytest.raises(DataError, match="baseline 'ridge9': expected one of") as e:
        fit_baseline(train_cfg, "ridge9")
    assert all(repr(n) in str(e.value) for n in BASELINES)
