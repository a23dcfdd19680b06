"""Batch prediction of a whole split on a Ray Data actor pool, with the Serve predictor class.

One row per (subject, run): the actors (``cfg.serve.predict_actors``) each load the model once
(:meth:`Predictor.from_uri`) and open the feature store the model was trained on, read the
runs' features and predict a batch of runs at a time. The driver gathers
``{subject: {chunk_key: (n_trs, n_parcels)}}``.

Runs per split: ``friends-s7`` / ``ood`` -> the target sample numbers of the release (chunk
key = stimulus id); ``val`` -> the fMRI runs of ``data.val`` (chunk key = the run's task,
e.g. ``s06e01a``, n_trs = its fMRI length).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mirage.config import Config
from mirage.data.layout import TARGET_SETS
from mirage.errors import DataError, FeatureStoreError

PREDICT_SPLITS = (*TARGET_SETS, "val")
"""What ``split_items`` enumerates: the official target sets and the validation runs."""


@dataclass(frozen=True)
class RunItem:
    """One run to predict."""

    subject: str
    chunk: str
    stimulus: str
    n_trs: int


def chunk_key(fmri_key: str) -> str:
    """``ses-003_task-s06e01a`` -> ``s06e01a``; ``ses-001_task-life01_run-2`` -> ``life01_run-2``."""
    return fmri_key.split("task-", 1)[1] if "task-" in fmri_key else fmri_key


def split_items(cfg: Config, split: str) -> list[RunItem]:
    """The runs of ``split`` for every subject of ``cfg.data.subjects`` in the release."""
    from mirage.data.layout import Release

    if split not in PREDICT_SPLITS:
        raise DataError(f"split {split!r}: expected one of {list(PREDICT_SPLITS)}")
    release = Release(cfg.data.root)
    items: list[RunItem] = []
    if split == "val":
        from mirage.data.fmri import load_fmri
        from mirage.data.splits import split_runs

        for run in split_runs(release, cfg.data, "val"):
            if run.subject in cfg.data.subjects:
                n_trs = load_fmri(run.path, run.key).shape[0]
                items.append(RunItem(run.subject, chunk_key(run.key), run.stimulus_id, int(n_trs)))
    else:
        for sub in cfg.data.subjects:
            for chunk, n_trs in sorted(release.target_samples(sub, split).items()):
                items.append(RunItem(sub, chunk, chunk, int(n_trs)))
    if not items:
        raise DataError(f"{cfg.data.root}: no runs for split {split!r} (subjects {cfg.data.subjects})")
    return items


class PredictActor:
    """Ray Data callable class: one Predictor and feature store per actor; rows of runs -> predictions."""

    def __init__(self, model_uri: str, cfg_tree: dict[str, Any]):
        from mirage.distributed.serve import open_model_store
        from mirage.predictor import Predictor

        cfg = Config.model_validate(cfg_tree)
        device = "cuda" if cfg.serve.gpus_per_replica > 0 else "cpu"
        self.predictor = Predictor.from_uri(
            model_uri, tracking_uri=cfg.tracking.uri, device=device, window_batch=cfg.serve.window_batch
        )
        self.store = open_model_store(self.predictor, cfg.features.store)
        if self.store is None:
            raise FeatureStoreError(f"no feature store of this model under {cfg.features.store}; run `mirage extract`")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from mirage.predictor import RunRequest

        reqs = []
        for stim, sub, n in zip(batch["stimulus"], batch["subject"], batch["n_trs"]):
            if not self.store.has(str(stim)):
                raise FeatureStoreError(f"feature store {self.store.key}: no features for {stim!r}; run `mirage extract`")
            reqs.append(RunRequest(self.store.read(str(stim)), str(sub), int(n)))
        preds = self.predictor.predict_runs(reqs)
        return {
            "subject": list(batch["subject"]),
            "chunk": list(batch["chunk"]),
            "n_trs": [p.shape[0] for p in preds],
            "n_parcels": [p.shape[1] for p in preds],
            "prediction": [p.tobytes() for p in preds],
        }


def predict_split(cfg: Config, model_uri: str, split: str, runs_per_batch: int = 4) -> dict[str, dict[str, np.ndarray]]:
    """Predict every run of ``split``: ``{subject: {chunk_key: float32 (n_trs, n_parcels)}}``."""
    import ray

    from mirage.distributed.cluster import check_cluster_gpus, init_ray

    items = split_items(cfg, split)
    init_ray(cfg.ray)
    check_cluster_gpus(cfg, "predict")  # a GPU request the cluster can never meet would wait forever
    ds = ray.data.from_items([vars(i) for i in items])
    out = ds.map_batches(
        PredictActor,
        fn_constructor_kwargs={"model_uri": model_uri, "cfg_tree": cfg.to_dict()},
        batch_size=runs_per_batch,
        compute=ray.data.ActorPoolStrategy(size=cfg.serve.predict_actors),
        num_cpus=cfg.serve.cpus_per_replica,
        num_gpus=cfg.serve.gpus_per_replica,
    )
    preds: dict[str, dict[str, np.ndarray]] = {}
    for row in out.iter_rows():
        arr = np.frombuffer(row["prediction"], dtype=np.float32).reshape(int(row["n_trs"]), int(row["n_parcels"]))
        preds.setdefault(str(row["subject"]), {})[str(row["chunk"])] = arr.copy()
    missing = [(i.subject, i.chunk) for i in items if i.chunk not in preds.get(i.subject, {})]
    if missing:
        raise RuntimeError(f"batch prediction lost runs {missing[:5]}")
    return preds
