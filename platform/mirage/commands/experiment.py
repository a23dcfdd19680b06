"""``mirage experiment run NAME``, ``mirage experiment report NAME`` and ``mirage experiment list``.

NAME is an experiment preset (``mirage/presets/experiments/<name>.yaml``: fig1a, fig1b, fig2c, fig3,
fig4, example) or a path to an experiment YAML. On the embedded default (``--config demo``, or no
``--config``) the spec's ``demo`` block applies; ``--variant full`` runs the spec as declared.
"""

from __future__ import annotations

import argparse
import math
import sys

from rich.console import Console
from rich.table import Table

from mirage.config import DEFAULT_PRESET, Config
from mirage.preflight import preflight

VARIANTS = ("auto", "demo", "full")


def _add_name(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME", help="experiment preset name (see `mirage experiment list`) or YAML path")


def add_run_args(p: argparse.ArgumentParser) -> None:
    _add_name(p)
    p.add_argument(
        "--variant", choices=VARIANTS, default="auto",
        help="demo: the spec's small demo block; full: the spec as declared; auto (default): demo on the "
        "embedded default preset (--config demo or none), full otherwise",
    )


def add_report_args(p: argparse.ArgumentParser) -> None:
    _add_name(p)


def add_list_args(p: argparse.ArgumentParser) -> None:
    return None


def use_demo(a: argparse.Namespace) -> bool:
    """Whether the spec's demo block applies (``--variant``, or auto on the embedded default)."""
    if a.variant != "auto":
        return a.variant == "demo"
    return a.config in (None, DEFAULT_PRESET)


def run(cfg: Config, a: argparse.Namespace) -> int:
    """Run a declared experiment as a Ray Tune grid (resumable) under one MLflow run, then its report."""
    from mirage.experiments.spec import load_spec

    user_keys = [item.split("=", 1)[0].strip() for item in a.overrides]
    spec = load_spec(a.name, demo=use_demo(a)).yielding_base(user_keys)
    spec.check(cfg)
    preflight(cfg, {"tracking", "gpus"})
    from mirage.pipeline.experiment import run_experiment  # lazy: see mirage.commands

    try:
        out = run_experiment(cfg, spec)
    except KeyboardInterrupt:
        print(f"[mirage] experiment {spec.name} interrupted; run the same command again to resume it", file=sys.stderr)
        return 130
    g = out.grid
    print(f"[mirage] experiment {spec.name}: {len(g.trained)} trials run, {len(g.skipped)} already done, "
          f"{len(out.ensembles)} seed ensembles scored; MLflow run {out.parent_run_id}")
    print_report(cfg, spec.name, out.report)
    return 0


def report(cfg: Config, a: argparse.Namespace) -> int:
    """Recompute an experiment's table and figures from its runs in MLflow and log them there."""
    from mirage.config import ConfigError
    from mirage.experiments.spec import load_spec

    try:
        name = load_spec(a.name).name
    except ConfigError:  # no such preset or file here: the name as the runs were tagged
        name = a.name
    preflight(cfg, {"tracking"})
    from mirage.pipeline.experiment import write_report  # lazy: see mirage.commands

    print_report(cfg, name, write_report(cfg, name))
    return 0


def list_experiments(cfg: Config, a: argparse.Namespace) -> int:
    """List the experiment presets with their trial counts (full and demo) and descriptions."""
    from mirage.experiments.spec import load_spec, spec_names

    t = Table(title="Experiment presets (mirage experiment run NAME)")
    for col in ("name", "trials", "demo trials", "description"):
        t.add_column(col)
    for name in spec_names():
        full, demo = load_spec(name), load_spec(name, demo=True)
        t.add_row(name, str(len(full.trials())), str(len(demo.trials())), full.description.strip().split("\n")[0])
    Console(width=None if sys.stdout.isatty() else 160).print(t)
    return 0


def print_report(cfg: Config, name: str, rep) -> None:
    """The experiment table (mean r, SEM over subjects, normalised r), the figures logged, the MLflow UI command."""
    con = Console(width=None if sys.stdout.isatty() else 200)
    t = Table(title=f"Experiment {name}: mean r over subjects (SEM); r / noise ceiling where a ceiling exists")
    for col in ("row", "split", "seeds", "subjects", "mean r", "SEM", "r / ceiling"):
        t.add_column(col, justify="left" if col in ("row", "split") else "right")
    for r in rep.rows:
        norm = "-" if not math.isfinite(r["mean_r_norm"]) else f"{r['mean_r_norm']:.4f} ({r['sem_norm']:.4f})"
        t.add_row(r["row"], r["split"], str(r["n_seeds"]), str(r["n_subjects"]), f"{r['mean_r']:.4f}",
                  f"{r['sem']:.4f}", norm)
    con.print(t)
    if rep.figures:
        con.print("figures: " + ", ".join(f"figures/{k}.png" for k in rep.figures))
    for note in rep.notes:
        con.print(f"note: {note}")
    con.print(f"browse: mlflow ui --backend-store-uri {cfg.tracking.uri}")
