"""Fit and score the ridge baselines (:data:`mirage.baselines.BASELINES`), each an MLflow run."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from mirage import tracking
from mirage.baselines import BASELINES, BaselineResult, fit_baseline
from mirage.config import Config


def run_baselines(
    cfg: Config, names: list[str] | None = None, *, track: bool = True, progress: bool = False
) -> list[BaselineResult]:
    """Fit and score baselines (default: every one); each is an MLflow run (``mirage.kind=baseline``) when ``track``.

    The run holds the validation scores (``val_r``, ``val_r_official`` and per subject), the PCA
    components kept per modality, the store layers read (tag ``mirage.baseline_layers``) and, as
    artifacts under ``validation/``, the per-parcel r and the chosen alphas, (n_subjects, n_parcels)
    each. ``progress``: show each baseline's subjects done on stderr.
    """
    out = []
    for name in names or list(BASELINES):
        if not track:
            out.append(fit_baseline(cfg, name, progress=progress))
            continue
        with tracking.tracked_run(cfg, "baseline", f"baseline-{name}", tags={"mirage.baseline": name}) as run_id:
            res = fit_baseline(cfg, name, progress=progress)
            _log(cfg, run_id, res)
            out.append(res)
    return out


def _log(cfg: Config, run_id: str, res: BaselineResult) -> None:
    uri = cfg.tracking.uri
    pca = {f"pca_components/{m}": int(p.n_components_) for m, (_, p) in res.reducers.items()}
    tracking.log_metrics(
        uri, run_id,
        {"val_r": res.val_r, "val_r_official": res.val_r_official,
         **{f"val_r_official/{s}": v for s, v in res.val_r_subject.items()}, **pca},
        step=0,
    )
    tracking.set_tags(uri, run_id, {"mirage.baseline_layers": ",".join(map(str, res.layers))})
    with tempfile.TemporaryDirectory() as d:
        np.save(Path(d) / "val_r.npy", res.r)
        np.save(Path(d) / "alphas.npy", res.alphas)
        tracking.log_artifacts(uri, run_id, d, "validation")
