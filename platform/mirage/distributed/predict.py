"""Batch prediction of a whole split on a Ray Data actor pool.

One row per run (:class:`mirage.data.run_key.RunKey`): the actors (``cfg.serve.predict_actors``)
each load the model once (:func:`mirage.tracking.models.load_predictor`) and open the feature store
the model was trained on, read the runs' features and predict a batch of runs at a time through
:meth:`mirage.predictor.Predictor.predict_runs`. The driver gathers
``{subject: {run name: (n_trs, n_parcels)}}``, the layout of the submission files.

Runs per split: ``friends-s7`` / ``ood`` -> the target sample numbers of the release (run name =
the chunk key, the stimulus id); ``val`` -> the fMRI runs of ``data.val`` (run name ``s06e01a``,
``#2`` appended for a repeated viewing; n_trs = its fMRI length).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from mirage.config import Config
from mirage.data.fmri import load_fmri
from mirage.data.layout import TARGET_SETS, Release
from mirage.data.run_key import RunKey, nest
from mirage.distributed.cluster import check_cluster_gpus, init_ray
from mirage.errors import DataError, FeatureStoreError
from mirage.predictor import open_model_store, stored_runs
from mirage.tracking.models import load_predictor
from mirage.valpred import validation_keys

PREDICT_SPLITS = (*TARGET_SETS, "val")
"""What ``split_items`` enumerates: the official target sets and the validation runs."""


@dataclass(frozen=True)
class RunItem:
    """One run to predict and its length in TRs."""

    key: RunKey
    n_trs: int

    def row(self) -> dict[str, Any]:
        """The Ray Data row of this run."""
        k = self.key
        return {"subject": k.subject, "stimulus": k.stimulus, "repeat": k.repeat, "n_trs": self.n_trs}


def split_items(cfg: Config, split: str) -> list[RunItem]:
    """The runs of ``split`` for every subject of ``cfg.data.subjects`` in the release."""
    if split not in PREDICT_SPLITS:
        raise DataError(f"split {split!r}: expected one of {list(PREDICT_SPLITS)}")
    items: list[RunItem] = []
    if split == "val":
        for key, run in validation_keys(cfg):
            items.append(RunItem(key, int(load_fmri(run.path, run.key).shape[0])))
    else:
        release = Release(cfg.data.root)
        for sub in cfg.data.subjects:
            for chunk, n_trs in sorted(release.target_samples(sub, split).items()):
                items.append(RunItem(RunKey(sub, chunk), int(n_trs)))
    if not items:
        raise DataError(f"{cfg.data.root}: no runs for split {split!r} (subjects {cfg.data.subjects})")
    return items


class PredictActor:
    """Ray Data callable class: one Predictor and feature store per actor; rows of runs -> predictions."""

    def __init__(self, model_uri: str, cfg_tree: dict[str, Any]):
        cfg = Config.model_validate(cfg_tree)
        device = "cuda" if cfg.serve.gpus_per_replica > 0 else "cpu"
        self.predictor = load_predictor(
            model_uri, tracking_uri=cfg.tracking.uri, device=device, window_batch=cfg.serve.window_batch
        )
        self.store = open_model_store(self.predictor, cfg.features.store)
        if self.store is None:
            raise FeatureStoreError(f"no feature store of this model under {cfg.features.store}; run `mirage extract`")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        runs = {
            RunKey(str(sub), str(stim), int(rep)): int(n)
            for sub, stim, rep, n in zip(batch["subject"], batch["stimulus"], batch["repeat"], batch["n_trs"])
        }
        preds = self.predictor.predict_runs(stored_runs(self.store, runs))
        return {
            "subject": list(batch["subject"]),
            "stimulus": list(batch["stimulus"]),
            "repeat": list(batch["repeat"]),
            "n_trs": [p.shape[0] for p in preds],
            "n_parcels": [p.shape[1] for p in preds],
            "prediction": [p.tobytes() for p in preds],
        }


def predict_split(cfg: Config, model_uri: str, split: str, runs_per_batch: int = 4) -> dict[str, dict[str, np.ndarray]]:
    """Predict every run of ``split``: ``{subject: {run name: float32 (n_trs, n_parcels)}}``."""
    items = split_items(cfg, split)
    init_ray(cfg.ray)
    check_cluster_gpus(cfg, "predict")  # a GPU request the cluster can never meet would wait forever
    ds = ray.data.from_items([i.row() for i in items])
    out = ds.map_batches(
        PredictActor,
        fn_constructor_kwargs={"model_uri": model_uri, "cfg_tree": cfg.to_dict()},
        batch_size=runs_per_batch,
        compute=ray.data.ActorPoolStrategy(size=cfg.serve.predict_actors),
        num_cpus=cfg.serve.cpus_per_replica,
        num_gpus=cfg.serve.gpus_per_replica,
    )
    preds: dict[RunKey, np.ndarray] = {}
    for row in out.iter_rows():
        arr = np.frombuffer(row["prediction"], dtype=np.float32).reshape(int(row["n_trs"]), int(row["n_parcels"]))
        preds[RunKey(str(row["subject"]), str(row["stimulus"]), int(row["repeat"]))] = arr.copy()
    missing = [i.key.name for i in items if i.key not in preds]
    if missing:
        raise RuntimeError(f"batch prediction lost runs {missing[:5]}")
    return nest(preds)
