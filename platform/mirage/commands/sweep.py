"""``mirage sweep`` and ``mirage ensemble``.

``mirage sweep`` is the main job (``jobs/sweep.py``): make sure the dataset and features exist,
run the Tune sweep, build the ensemble from it, print a summary and the ``mlflow ui`` command.
``mirage ensemble`` rebuilds the ensemble from a finished sweep.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from mirage.cli import command
from mirage.config import Config
from mirage.errors import DataError, MirageError
from mirage.preflight import on_cluster, preflight


def _has_dataset(root: Path) -> bool:
    return (root / "fmri").is_dir() and (root / "stimuli").is_dir()


def ensure_inputs(cfg: Config) -> None:
    """Dataset and feature store, created on the embedded default when missing.

    The synthetic dataset is written to a missing ``data.root`` only by a local run of a preset
    that says so (``data.synthetic``, the demo); otherwise a missing or empty ``data.root`` is a
    DataError naming it. Missing features are extracted (only what is missing).
    """
    root = Path(cfg.data.root)
    if not _has_dataset(root):
        if on_cluster(cfg):
            raise DataError(
                f"data.root={root}: no dataset there (expected fmri/ and stimuli/ in the Algonauts 2025 layout); "
                "on a cluster stage the dataset on shared storage and pass --set data.root=<path>"
            )
        if not cfg.data.synthetic:
            state = "does not exist" if not root.exists() else "no dataset there"
            raise DataError(
                f"data.root={root}: {state} (expected fmri/ and stimuli/ in the Algonauts 2025 layout); "
                "point it to the release with --set data.root=<path>, or set data.synthetic=true "
                "to write the synthetic dataset there"
            )
        from mirage.data.synth import write_synthetic

        print(f"[mirage] data.synthetic=true: writing the synthetic dataset to {root}", flush=True)
        write_synthetic(root, cfg.data.synth, tr=cfg.data.tr, progress=False)
    from mirage.features.extract import stimuli_of
    from mirage.features.store import open_store

    store = open_store(cfg.features, must_exist=False)
    missing = [s for s in stimuli_of(cfg) if store is None or not store.has(s)]
    if missing:
        from mirage.distributed.extract import run_extract

        print(f"[mirage] extracting features of {len(missing)} stimuli into {cfg.features.store}", flush=True)
        result = run_extract(cfg)
        failed = getattr(result, "failed", None)
        if failed:
            raise MirageError(f"feature extraction failed for {failed}; see `mirage extract` for details")


def _ensemble_args(p: argparse.ArgumentParser) -> None:
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


def _sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-ensemble", action="store_true", help="stop after the sweep")
    _ensemble_args(p)


@command("sweep", "the main job: data and features, Tune sweep, ensemble, registry", _sweep_args)
def sweep(cfg: Config, a: argparse.Namespace) -> int:
    from mirage.distributed.cluster import init_ray
    from mirage.distributed.sweep import run_sweep

    cfg = _ensemble_overrides(cfg, a)
    preflight(cfg, {"tracking", "gpus"})
    import ray

    try:
        ensure_inputs(cfg)
        preflight(cfg, {"data", "features"})
        init_ray(cfg.ray)
        res = run_sweep(cfg)
        if res.interrupted:
            print(f"[mirage] sweep {cfg.sweep.name} interrupted; run the same command again to resume it", file=sys.stderr)
            return 130
        outcome = None
        if not a.no_ensemble:
            from mirage.distributed.ensemble import build_ensemble

            outcome = build_ensemble(cfg, res)
        print_summary(cfg, res, outcome)
        return 0
    finally:
        if ray.is_initialized():
            ray.shutdown()


@command("ensemble", "train the members of a finished sweep, weight them, register the ensemble", _ensemble_args)
def ensemble(cfg: Config, a: argparse.Namespace) -> int:
    from mirage.distributed.cluster import init_ray
    from mirage.distributed.ensemble import build_ensemble
    from mirage.distributed.sweep import load_sweep

    cfg = _ensemble_overrides(cfg, a)
    preflight(cfg, {"tracking", "gpus", "data", "features"})
    res = load_sweep(cfg)
    import ray

    try:
        init_ray(cfg.ray)
        outcome = build_ensemble(cfg, res)
        print_summary(cfg, res, outcome)
        return 0
    finally:
        if ray.is_initialized():
            ray.shutdown()


def print_summary(cfg: Config, res, outcome) -> None:
    """Best trial and its config; ensemble vs best single member per subject; the MLflow UI command."""
    from rich.console import Console
    from rich.table import Table

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
