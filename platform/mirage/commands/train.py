"""``mirage train`` and ``mirage baseline``."""

from __future__ import annotations

import argparse
import json

from mirage.baselines import BASELINES
from mirage.config import Config
from mirage.preflight import preflight


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", default=None, help="run name (storage folder); the same name resumes that run")
    p.add_argument("--no-track", action="store_true", help="do not open an MLflow run")


def train(cfg: Config, a: argparse.Namespace) -> int:
    """Train MIRAGE with Ray Train (FSDP2), tracked in MLflow, resumable."""
    preflight(cfg, {"gpus", "data", "features"} | (set() if a.no_track else {"tracking"}))
    from mirage.pipeline.train import train as train_model  # lazy: see mirage.commands

    res = train_model(cfg, name=a.name, track=not a.no_track)
    print(
        json.dumps(
            {
                "name": res.name,
                "best_val_r": res.best_val_r,
                "best_epoch": res.best_epoch,
                "model_dir": res.model_dir,
                "mlflow_run_id": res.mlflow_run_id,
                "epochs": [h["epoch"] for h in res.history],
            },
            indent=2,
        )
    )
    return 0


def add_baseline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--which", action="append", choices=sorted(BASELINES), default=None,
        help="baseline to fit (repeatable); default: all",
    )
    p.add_argument("--no-track", action="store_true", help="do not open MLflow runs")


def baseline(cfg: Config, a: argparse.Namespace) -> int:
    """Fit the ridge baselines (challenge recipe, native-fusion linear) and score them."""
    preflight(cfg, {"data", "features"} | (set() if a.no_track else {"tracking"}))
    from mirage.pipeline.baselines import run_baselines  # lazy: see mirage.commands

    for res in run_baselines(cfg, a.which, track=not a.no_track, progress=True):
        subj = ", ".join(f"{s} {v:.3f}" for s, v in res.val_r_subject.items())
        print(f"{res.name}: val r {res.val_r_official:.4f}, official form ({subj}); every TR {res.val_r:.4f}")
    return 0
