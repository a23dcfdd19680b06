"""Whole-run validation predictions of a model, keyed as the ensemble reads them.

The training loop saves one set per epoch (``ensemble.epoch_predictions``), so that an ensemble
can choose each member's epoch on one fold of the validation runs and be scored on the other
(:func:`mirage.ensemble.cross_fit`). Pure torch/numpy: no Ray, no MLflow.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mirage.config import Config

Predictions = dict[str, dict[str, np.ndarray]]


def run_ids(runs) -> dict[str, dict[str, Any]]:
    """subject -> run id -> FmriRun: the run id is the stimulus id, ``#2``, ``#3`` appended when a subject saw it again.

    runs: FmriRun records of one split, in release order.
    """
    out: dict[str, dict[str, Any]] = {}
    for run in runs:
        mine = out.setdefault(run.subject, {})
        key, n = run.stimulus_id, 1
        while key in mine:
            n += 1
            key = f"{run.stimulus_id}#{n}"
        mine[key] = run
    return out


def predict_validation(model, cfg: Config, ds, device) -> Predictions:
    """Predict every validation run of ``ds`` whole, window by window (as :func:`mirage.analysis.predict_run`).

    Every rank of a sharded model must call this (the forward passes gather parameters).

    Args:
        model: the model (put in eval mode here).
        ds: the validation :class:`mirage.train.data.WindowDataset` (its store, layers, runs).
        device: where the model lives.
    Returns:
        subject -> run id -> (n_trs, n_parcels) float32.
    """
    import torch

    from mirage.analysis import model_inputs
    from mirage.data.layout import Release
    from mirage.data.splits import split_runs
    from mirage.data.windows import windows_for_prediction
    from mirage.train.data import _fmri_shape

    subjects = list(cfg.data.subjects)
    runs = [r for r in split_runs(Release(cfg.data.root), cfg.data, "val") if r.subject in subjects]
    model.eval()
    out: Predictions = {}
    with torch.no_grad():
        for sub, rs in run_ids(runs).items():
            sid = torch.tensor([subjects.index(sub)], device=device)
            for key, run in rs.items():
                n_trs = _fmri_shape(str(run.path), run.key)[0]
                feats = ds.store.read(run.stimulus_id)
                rows = []
                for w in windows_for_prediction(n_trs, cfg.data, ds.store.rate_hz, len(feats)):
                    x = model_inputs(feats, ds.layers, list(cfg.model.modalities), w.frame_start, w.frame_stop)
                    y = model({m: t.to(device) for m, t in x.items()}, sid)[0]  # (window_trs, P)
                    rows.append(y[: w.n_valid].float().cpu().numpy())
                out.setdefault(sub, {})[key] = np.concatenate(rows)[:n_trs].astype(np.float32)
    return out
