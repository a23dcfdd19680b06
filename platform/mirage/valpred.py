"""Whole-run validation predictions of a model in training, keyed as the ensemble reads them.

The training loop saves one set per epoch (``ensemble.epoch_predictions``), so that an ensemble
can choose each member's epoch on one fold of the validation runs and be scored on the other
(:func:`mirage.ensemble.cross_fit`). The live model predicts through
:meth:`mirage.predictor.Predictor.from_model`, the path every other prediction takes. Pure
torch/numpy: no Ray, no MLflow.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mirage.config import Config
from mirage.data.layout import Release
from mirage.data.run_key import RunKey, nest, run_keys
from mirage.data.splits import split_runs
from mirage.predictor import Predictor, predict_stored
from mirage.train.data import _fmri_shape

Predictions = dict[str, dict[str, np.ndarray]]


def validation_keys(cfg: Config) -> list[tuple[RunKey, Any]]:
    """(RunKey, FmriRun) of every validation run of ``cfg.data.subjects``, in release order."""
    subjects = set(cfg.data.subjects)
    runs = [r for r in split_runs(Release(cfg.data.root), cfg.data, "val") if r.subject in subjects]
    return run_keys(runs)


def predict_validation(model: torch.nn.Module, cfg: Config, ds, device: torch.device) -> Predictions:
    """Predict every validation run of ``ds`` whole, window by window.

    Every rank of a sharded model must call this: all ranks predict the same runs in the same
    batches, so they run the same forward passes (which gather parameters).

    Args:
        model: the model in training (put in eval mode here).
        ds: the validation :class:`mirage.train.data.WindowDataset` (its store and layers).
        device: where the model lives.
    Returns:
        subject -> run name (``s06e01a``, ``s06e01a#2``) -> (n_trs, n_parcels) float32.
    """
    predictor = Predictor.from_model(model, cfg, ds.layers, device, n_layers=ds.store.n_layers,
                                     window_batch=cfg.serve.window_batch)
    runs = {key: _fmri_shape(str(run.path), run.key)[0] for key, run in validation_keys(cfg)}
    return nest(predict_stored(predictor, ds.store, runs))
