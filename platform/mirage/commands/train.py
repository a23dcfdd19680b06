"""``mirage train`` and ``mirage baseline``."""

from __future__ import annotations

import argparse
import json

from mirage.cli import command
from mirage.config import Config
from mirage.preflight import preflight


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", default=None, help="run name (storage folder); the same name resumes that run")
    p.add_argument("--no-track", action="store_true", help="do not open an MLflow run")


@command("train", "train MIRAGE with Ray Train (FSDP2), tracked in MLflow, resumable", _train_args)
def train(cfg: Config, a: argparse.Namespace) -> int:
    from mirage.distributed.progress import EpochLines
    from mirage.distributed.train import run_training

    preflight(cfg, {"gpus", "data", "features"} | (set() if a.no_track else {"tracking"}))
    try:
        res = run_training(cfg, name=a.name, track=not a.no_track, callbacks=[EpochLines(cfg.train.epochs)])
    finally:
        import ray

        ray.shutdown()
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


def _baseline_args(p: argparse.ArgumentParser) -> None:
    from mirage.baselines import BASELINES

    p.add_argument(
        "--which", action="append", choices=sorted(BASELINES), default=None,
        help="baseline to fit (repeatable); default: all",
    )
    p.add_argument("--no-track", action="store_true", help="do not open MLflow runs")


@command("baseline", "fit the ridge baselines (challenge recipe, native-fusion linear) and score them", _baseline_args)
def baseline(cfg: Config, a: argparse.Namespace) -> int:
    from mirage.baselines import run_baselines

    preflight(cfg, {"data", "features"} | (set() if a.no_track else {"tracking"}))
    for res in run_baselines(cfg, a.which, track=not a.no_track, progress=True):
        subj = ", ".join(f"{s} {v:.3f}" for s, v in res.val_r_subject.items())
        print(f"{res.name}: val r {res.val_r_official:.4f}, official form ({subj}); every TR {res.val_r:.4f}")
    return 0
