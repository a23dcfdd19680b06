"""One training run from the command line: Ray Train, tracked in MLflow, resumable by name."""

from __future__ import annotations

from mirage.config import Config
from mirage.distributed.cluster import ray_session
from mirage.distributed.progress import EpochLines
from mirage.distributed.train import TrainResult, run_training


def train(cfg: Config, *, name: str | None = None, track: bool = True) -> TrainResult:
    """Train ``cfg`` (:func:`mirage.distributed.train.run_training`), one line per epoch on stderr.

    ``name``: the run's folder in ``train.storage`` (the same name resumes it); ``track``: open an
    MLflow run. Ray is joined, or started for this run and shut down after it.
    """
    with ray_session(cfg.ray, start=False):
        return run_training(cfg, name=name, track=track, callbacks=[EpochLines(cfg.train.epochs)])
