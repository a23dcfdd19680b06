"""``mirage sweep`` and ``mirage ensemble``.

``mirage sweep`` is the main job (``jobs/sweep.py``): make sure the dataset and features exist,
run the Tune sweep, build the ensemble from it, print a summary and the ``mlflow ui`` command.
``mirage ensemble`` rebuilds the ensemble from a finished sweep.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from rich.console import Console
from rich.table import Table

from mirage.config import Config
from mirage.preflight import preflight


def add_ensemble_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--skip-analysis", action="store_true", help="do not log interpretability artifacts")
    p.add_argument(
        "--promote", action="store_true",
        help="move the champion alias to the new ensemble even if its held-out score is below the champion's",
    )


def _ensemble_overrides(cfg: Config, a: argparse.Namespace) -> Config:
    """``--skip-analysis`` and ``--promote`` as config values."""
    if a.skip_analysis:
        cfg = cfg.with_overrides({"ensemble.analysis": False})
    if a.promote:
        cfg = cfg.with_overrides({"ensemble.promote": True})
    return cfg


def add_sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-ensemble", action="store_true", help="stop after the sweep")
    add_ensemble_args(p)


def sweep(cfg: Config, a: argparse.Namespace) -> int:
    """The main job: data and features, Tune sweep, ensemble, registry."""
    cfg = _ensemble_overrides(cfg, a)
    preflight(cfg, {"tracking", "gpus"})
    from mirage.pipeline.sweep import sweep_and_ensemble  # lazy: see mirage.commands

    done = sweep_and_ensemble(cfg, ensemble=not a.no_ensemble)
    if done.sweep.interrupted:
        print(f"[mirage] sweep {cfg.sweep.name} interrupted; run the same command again to resume it", file=sys.stderr)
        return 130
    print_summary(cfg, done.sweep, done.ensemble)
    return 0


def ensemble(cfg: Config, a: argparse.Namespace) -> int:
    """Train the members of a finished sweep, weight them, register the ensemble."""
    cfg = _ensemble_overrides(cfg, a)
    preflight(cfg, {"tracking", "gpus", "data", "features"})
    from mirage.pipeline.sweep import ensemble_of_sweep  # lazy: see mirage.commands

    done = ensemble_of_sweep(cfg)
    print_summary(cfg, done.sweep, done.ensemble)
    return 0


def print_summary(cfg: Config, res, outcome) -> None:
    """Best trial and its config; ensemble vs best single member per subject; the MLflow UI command."""
    con = Console(width=None if sys.stdout.isatty() else 160)
    best = res.best
    t = Table(title=f"Sweep {res.name}: {len(res.trials)} trials, best {res.metric} ({res.mode})")
    t.add_column("trial")
    t.add_column(res.metric, justify="right")
    t.add_column("epochs", justify="right")
    t.add_column("status")
    for key in cfg.sweep.space:
        t.add_column(key)
    for tr in res.ranked() + [x for x in res.trials if x.best is None]:
        mark = " *" if best and tr.trial_id == best.trial_id else ""
        t.add_row(
            tr.trial_id + mark, "-" if tr.best is None else f"{tr.best:.4f}", str(tr.epochs),
            tr.status + (" (ASHA)" if tr.stopped_early else ""), *[_fmt(tr.params.get(k)) for k in cfg.sweep.space],
        )
    con.print(t)
    if best:
        con.print("best config: " + " ".join(f"--set {k}={_fmt(v)}" for k, v in best.params.items()))
    if outcome is not None:
        cf, m = outcome.fit, outcome.metrics
        e = Table(title=f"Ensemble of {len(outcome.members)}: cross-fitted validation r (official form), "
                        f"{len(cf.candidates)} candidates")
        for col in ("fit on -> scored on", "ensemble r", "best member r", "mean member r", "weight entropy",
                    "member corr", "members"):
            e.add_column(col, justify="left" if col.startswith("fit") else "right")
        for i, f in enumerate(cf.folds):
            e.add_row(
                f"fold {i}: {len(f.fit_runs)} runs -> {len(f.score_runs)} runs", f"{f.ensemble_r:.4f}",
                f"{f.best_member_r:.4f}", f"{f.mean_member_r:.4f}",
                f"{f.entropy:.3f} / {np.log(len(f.members)):.3f}", f"{f.member_corr:.3f}", str(len(f.members)),
            )
        e.add_row("mean over folds", f"{m['ensemble_r']:.4f}", f"{m['best_member_r']:.4f}",
                  f"{m['mean_member_r']:.4f}", f"{m['weight_entropy']:.3f}", f"{m['member_corr']:.3f}", "")
        con.print(e)
        gain = m["ensemble_r"] - m["best_member_r"]
        con.print(f"cross-fitted: ensemble r {m['ensemble_r']:.4f} vs best member r {m['best_member_r']:.4f} "
                  f"({'+' if gain >= 0 else ''}{gain:.4f}); weights shipped: refit on all validation runs")
        con.print(f"registered: {outcome.model_uri} (version {outcome.version}); ensemble dir {outcome.directory}")
        decision = getattr(outcome, "champion", None)
        if decision is not None:
            verb = "moved to" if decision.promoted else "kept on"
            held = decision.version if decision.promoted else (decision.previous_version or "-")
            con.print(f"alias @{decision.alias} {verb} version {held}: {decision.reason}")
    con.print(f"browse: mlflow ui --backend-store-uri {cfg.tracking.uri}")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)
