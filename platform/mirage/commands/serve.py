"""``mirage serve``, ``mirage predict`` and ``mirage score``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mirage.cli import command
from mirage.config import Config
from mirage.errors import DataError
from mirage.preflight import preflight

MODEL_HELP = "model URI: models:/<name>@<alias>, runs:/<run_id>/<path>, or a local model directory"


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--host", default=None, help="bind address (default serve.host, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default serve.port, 8000)")


@command("serve", "serve predictions over HTTP with Ray Serve", _serve_args)
def serve_cmd(cfg: Config, a: argparse.Namespace) -> int:
    from mirage.distributed.serve import run_server

    updates = {f"serve.{k}": getattr(a, k) for k in ("host", "port") if getattr(a, k) is not None}
    cfg = cfg.with_overrides(updates) if updates else cfg
    preflight(cfg, {"gpus", "model"}, model_uri=a.model, gpus_for="serve")
    started = not _ray_running()
    try:
        run_server(cfg, a.model, blocking=True)
    finally:
        if started:
            _shutdown_ray()
    return 0


def _predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--split", required=True, choices=["friends-s7", "ood", "val"], help="runs to predict")
    p.add_argument("--out", required=True, help="output folder")


@command("predict", "predict a split (Ray Data); writes the Algonauts submission for friends-s7/ood", _predict_args)
def predict_cmd(cfg: Config, a: argparse.Namespace) -> int:
    from mirage.data.layout import Release
    from mirage.distributed.predict import predict_split
    from mirage.submission import write_predictions, write_submission

    splits = ("val",) if a.split == "val" else ()
    preflight(cfg, {"gpus", "data", "model"}, model_uri=a.model, gpus_for="predict", splits=splits)
    started = not _ray_running()
    try:
        preds = predict_split(cfg, a.model, a.split)
    finally:
        if started:
            _shutdown_ray()
    out = Path(a.out)
    if a.split == "val":
        path = write_predictions(preds, out / "predictions_val.npz")
    else:
        release = Release(cfg.data.root)
        targets = {sub: release.target_samples(sub, a.split) for sub in preds}
        path = write_submission(preds, a.split, out, targets)
    n = sum(len(v) for v in preds.values())
    print(f"{n} runs of {len(preds)} subjects predicted -> {path}")
    return 0


def _score_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("predictions", help="predictions_val.npz from `mirage predict`, or a submission zip")
    p.add_argument("--split", default=None, choices=["friends-s7", "ood", "val"],
                   help="scoring rule (default: from the file)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


@command("score", "score predictions against the dataset's fMRI with the official rule", _score_args)
def score_cmd(cfg: Config, a: argparse.Namespace) -> int:
    from mirage.submission import fmri_targets, read_predictions, read_submission, score_predictions

    path = Path(a.predictions)
    if not path.is_file():
        raise DataError(f"{path}: predictions file not found")
    if path.suffix == ".zip":
        split, preds = read_submission(path)
    else:
        split, preds = "val", read_predictions(path)
    split = a.split or split
    targets = fmri_targets(cfg.data.root, cfg.data, {s: list(v) for s, v in preds.items()})
    scores = score_predictions(preds, targets, split)
    if a.json:
        print(json.dumps(scores))
    else:
        print(f"{split} score (mean Pearson r; first and last 5 TRs of every chunk dropped): {scores['score']:.4f}")
        for sub in sorted(targets):
            print(f"  {sub}: {scores[sub]:.4f}")
    return 0


def _ray_running() -> bool:
    import ray

    return ray.is_initialized()


def _shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
