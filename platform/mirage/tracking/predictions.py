"""Per-epoch validation predictions of a training run as MLflow artifacts.

Training logs each epoch's whole-run validation predictions
(:func:`mirage.valpred.predict_validation`) as ``val_predictions/epoch_NNNN.npz`` of its run
(:func:`mirage.submission.write_predictions` layout: one float32 array per ``subject/run name``);
the ensemble stage downloads them to choose each member's epoch.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from mirage.submission import write_predictions
from mirage.tracking.models import download_run_artifacts
from mirage.tracking.runs import log_artifacts

EPOCH_PREDICTIONS = "val_predictions"
"""MLflow artifact folder of a training run's per-epoch validation predictions."""


class EpochPredictionLogger:
    """Logs each epoch's whole-run validation predictions as ``val_predictions/epoch_NNNN.npz`` of an MLflow run."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id

    def __call__(self, epoch: int, preds: dict[str, dict[str, np.ndarray]]) -> None:
        """preds: subject -> run name -> (n_trs, n_parcels)."""
        with tempfile.TemporaryDirectory(prefix="mirage-valpred-") as d:
            path = write_predictions(preds, Path(d) / f"epoch_{int(epoch):04d}.npz")
            log_artifacts(self.uri, self.run_id, path, EPOCH_PREDICTIONS)


def epoch_predictions(tracking_uri: str, run_id: str | None, dest: Path) -> dict[int, Path]:
    """epoch -> local .npz of the per-epoch validation predictions logged on an MLflow run ({} when none)."""
    if not run_id:
        return {}
    local = download_run_artifacts(tracking_uri, run_id, EPOCH_PREDICTIONS, dest)
    if local is None:  # a run that logged none (ensemble.epoch_predictions off, or older)
        return {}
    return {int(f.stem.split("_")[1]): f for f in sorted(local.glob("epoch_[0-9][0-9][0-9][0-9].npz"))}
