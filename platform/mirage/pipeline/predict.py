"""Predictions of a trained model outside training: a split to files, an HTTP server.

The model is any URI :mod:`mirage.tracking.models` resolves (``models:/``, ``runs:/``, a local
model directory); an MLflow URI is looked up in its store (:func:`check_model`) before Ray starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mirage import tracking
from mirage.config import Config
from mirage.data.layout import Release
from mirage.distributed.cluster import ray_session
from mirage.distributed.predict import predict_split
from mirage.distributed.serve import run_server
from mirage.model_dirs import is_mlflow_uri
from mirage.submission import write_predictions, write_submission

VAL_FILE = "predictions_val.npz"


@dataclass
class PredictedSplit:
    """Where the predictions of a split were written.

    Attributes:
        path: ``predictions_val.npz`` (val) or the submission zip (friends-s7, ood).
        n_runs: runs predicted, over all subjects.
        n_subjects: subjects predicted.
    """

    path: Path
    n_runs: int
    n_subjects: int


def check_model(cfg: Config, model_uri: str) -> None:
    """An MLflow model URI names a registered version or a run artifact of ``cfg.tracking.uri``
    (checked without downloading it); a local path is checked by :func:`mirage.preflight.check_model`.

    Raises:
        ModelLoadError: no such run, artifact, registered model or version.
    """
    if is_mlflow_uri(model_uri):
        tracking.check_model_uri(model_uri, cfg.tracking.uri)


def predict_to_files(cfg: Config, model_uri: str, split: str, out: str | Path) -> PredictedSplit:
    """Predict every run of ``split`` with a Ray Data actor pool and write them under ``out``.

    ``val``: ``out/predictions_val.npz``; ``friends-s7`` and ``ood``: the Algonauts submission zip,
    each run trimmed or padded to the release's target sample numbers.
    """
    check_model(cfg, model_uri)
    with ray_session(cfg.ray, start=False):
        preds = predict_split(cfg, model_uri, split)
    out = Path(out)
    if split == "val":
        path = write_predictions(preds, out / VAL_FILE)
    else:
        release = Release(cfg.data.root)
        targets = {sub: release.target_samples(sub, split) for sub in preds}
        path = write_submission(preds, split, out, targets)
    return PredictedSplit(path=Path(path), n_runs=sum(len(v) for v in preds.values()), n_subjects=len(preds))


def serve(cfg: Config, model_uri: str) -> None:
    """Serve ``model_uri`` over HTTP with Ray Serve on ``serve.host:serve.port`` until interrupted."""
    check_model(cfg, model_uri)
    with ray_session(cfg.ray, start=False):
        run_server(cfg, model_uri, blocking=True)
