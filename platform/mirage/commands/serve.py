"""``mirage serve``, ``mirage predict`` and ``mirage score``."""

from __future__ import annotations

import argparse
import json

from mirage.config import Config
from mirage.data.layout import TARGET_SETS
from mirage.preflight import preflight

MODEL_HELP = "model URI: models:/<name>@<alias>, runs:/<run_id>/<path>, or a local model directory"
SPLITS = (*TARGET_SETS, "val")
"""What ``predict`` and ``score`` accept: the two target sets of the submission, or the validation runs."""


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--host", default=None, help="bind address (default serve.host, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default serve.port, 8000)")


def serve(cfg: Config, a: argparse.Namespace) -> int:
    """Serve predictions over HTTP with Ray Serve."""
    updates = {f"serve.{k}": getattr(a, k) for k in ("host", "port") if getattr(a, k) is not None}
    cfg = cfg.with_overrides(updates) if updates else cfg
    preflight(cfg, {"port", "gpus", "model"}, model_uri=a.model, gpus_for="serve")
    from mirage.pipeline.predict import serve as serve_model  # lazy: see mirage.commands

    serve_model(cfg, a.model)
    return 0


def add_predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--split", required=True, choices=SPLITS, help="runs to predict")
    p.add_argument("--out", required=True, help="output folder")


def predict(cfg: Config, a: argparse.Namespace) -> int:
    """Predict a split (Ray Data); writes the Algonauts submission for friends-s7/ood."""
    splits = ("val",) if a.split == "val" else ()
    preflight(cfg, {"gpus", "data", "model"}, model_uri=a.model, gpus_for="predict", splits=splits)
    from mirage.pipeline.predict import predict_to_files  # lazy: see mirage.commands

    done = predict_to_files(cfg, a.model, a.split, a.out)
    print(f"{done.n_runs} runs of {done.n_subjects} subjects predicted -> {done.path}")
    return 0


def add_score_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("predictions", help="predictions_val.npz from `mirage predict`, or a submission zip")
    p.add_argument("--split", default=None, choices=SPLITS, help="scoring rule (default: from the file)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def score(cfg: Config, a: argparse.Namespace) -> int:
    """Score predictions against the dataset's fMRI with the official rule."""
    from mirage.pipeline.score import score_file  # lazy: see mirage.commands

    scores = score_file(cfg, a.predictions, a.split)
    if a.json:
        print(json.dumps(scores.raw))
    else:
        print(f"{scores.split} score (mean Pearson r; first and last 5 TRs of every chunk dropped): {scores.score:.4f}")
        for sub, r in scores.subjects.items():
            print(f"  {sub}: {r:.4f}")
    return 0
