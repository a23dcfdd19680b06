"""A finished training run as an MLflow model, with its inputs: what a user of MLflow expects of a run.

- :func:`log_trained_model`: the run's exported model directory logged as a pyfunc model named
  ``model`` (:data:`TRAINED_MODEL`; ``runs:/<run_id>/model``), with a signature and a small input
  example; the directory is copied as the pyfunc artifact ``predictor``, never re-serialised.
- :func:`log_dataset_inputs`: the fMRI runs of the training and validation splits and the feature
  store as MLflow dataset inputs (contexts ``training``, ``validation``, ``features``), each with a digest.
- :func:`log_figure`: a matplotlib figure under ``figures/<name>/<name>.png``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np

from mirage.config import Config
from mirage.tracking.runs import client

TRAINED_MODEL = "model"
"""Name of a training run's logged MLflow model: ``runs:/<run_id>/model``."""
MODEL_URI_TAG = "mirage.model_uri"
"""Run tag: ``models:/<model id>`` of the run's logged MLflow model."""
PACKAGE_DIR = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- model


def input_example(model_dir: str | Path) -> dict[str, Any]:
    """The smallest request the model accepts: one TR of zero features for its first subject.

    ``{"subject": str, "features": nested lists (n_frames, 3, n_layers, dim) of 0.0, "n_trs": 1}`` with
    ``n_frames`` the frames of one TR and ``n_layers`` what the model reads.
    """
    from mirage.predictor import Predictor

    return _example(Predictor.from_path(model_dir, device="cpu"))


def _example(p) -> dict[str, Any]:
    member = p.members[0]
    n_layers = member.n_layers if member.layers is None and member.n_layers else p.min_layers
    n_frames = max(int(np.ceil(p.rate_hz * p.cfg.data.tr)), 1)
    return {"subject": p.subjects[0], "features": np.zeros((n_frames, 3, n_layers, p.dim), np.float32).tolist(), "n_trs": 1}


def _signature(example: dict[str, Any], n_parcels: int):
    from mlflow.models import infer_signature

    return infer_signature(example, np.zeros((int(example["n_trs"]), n_parcels), np.float32))


def log_trained_model(uri: str, run_id: str, model_dir: str | Path) -> str:
    """Log the exported model ``model_dir`` as the pyfunc model ``model`` of ``run_id``; returns its ``models:/`` URI.

    The run keeps its status; the run is tagged ``mirage.model_uri``. Loadable with
    ``mlflow.pyfunc.load_model("runs:/<run_id>/model")`` and servable with ``mirage serve --model``.
    """
    from mirage.predictor import Predictor
    from mirage.tracking.pyfunc import MiragePyfunc, pip_requirements

    predictor = Predictor.from_path(model_dir, device="cpu")
    example, n_parcels = _example(predictor), predictor.n_parcels
    del predictor
    c = client(uri)
    status = c.get_run(run_id).info.status
    tracking_before = mlflow.get_tracking_uri() if mlflow.tracking.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)  # the fluent log_model needs it; restored below
    try:
        with mlflow.start_run(run_id=run_id, log_system_metrics=False):
            info = mlflow.pyfunc.log_model(
                name=TRAINED_MODEL,
                python_model=MiragePyfunc(),
                artifacts={"predictor": str(model_dir)},
                code_paths=[str(PACKAGE_DIR)],
                pip_requirements=pip_requirements(),
                signature=_signature(example, n_parcels),
                input_example=example,
            )
    finally:
        c.update_run(run_id, status=status)  # leaving the fluent run must not end ours
        mlflow.set_tracking_uri(tracking_before)
    model_uri = f"models:/{info.model_id}"
    c.set_tag(run_id, MODEL_URI_TAG, model_uri)
    return model_uri


# ---------------------------------------------------------------------------- inputs


def _digest(rows: list[dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fmri_dataset(cfg: Config, split: str):
    """The fMRI runs of split ``split`` ("train" or "val") as an MLflow pandas dataset.

    One row per run: subject, stimulus, h5 file (relative to ``data.root``), key, n_trs, n_parcels,
    file bytes. The digest hashes those rows (a changed file size, shape or selection changes it).
    """
    import pandas as pd
    from mlflow.data import from_pandas

    from mirage.data.layout import Release
    from mirage.data.splits import split_runs
    from mirage.train.data import _fmri_shape

    root = Path(cfg.data.root)
    rows = []
    for r in split_runs(Release(root), cfg.data, split):
        shape = _fmri_shape(str(r.path), r.key)
        rows.append({
            "subject": r.subject, "stimulus": r.stimulus_id, "file": str(Path(r.path).relative_to(root)),
            "key": r.key, "n_trs": int(shape[0]), "n_parcels": int(shape[1]), "bytes": Path(r.path).stat().st_size,
        })
    df = pd.DataFrame(rows, columns=["subject", "stimulus", "file", "key", "n_trs", "n_parcels", "bytes"])
    return from_pandas(df, source=str(root), name=f"fmri-{split}", digest=_digest(rows))


def feature_dataset(cfg: Config, stimuli: list[str] | None = None):
    """The feature store (``features.store``) as an MLflow pandas dataset named by its key.

    One row per stimulus (all, or ``stimuli``): shape, modality frame counts and the file's
    sha256 from the store manifest; the digest hashes those rows and the store key.
    """
    import pandas as pd
    from mlflow.data import from_pandas

    from mirage.features.store import open_store

    store = open_store(cfg.features)
    wanted = None if stimuli is None else set(stimuli)
    names = [s for s in store.stimuli() if wanted is None or s in wanted]
    rows = []
    for s in names:
        entry = store.manifest["stimuli"][s]
        rows.append({"stimulus": s, "n_frames": int(entry["shape"][0]), "shape": "x".join(map(str, entry["shape"])),
                     "sha256": entry.get("sha256", "")})
    df = pd.DataFrame(rows, columns=["stimulus", "n_frames", "shape", "sha256"])
    return from_pandas(df, source=str(store.root), name=f"features-{store.key}", digest=_digest([store.key, *rows]))


def log_dataset_inputs(cfg: Config, run_id: str) -> None:
    """The training and validation fMRI runs (contexts ``training``, ``validation``) and the feature store
    (context ``training``, tag ``mirage.input=features``) as dataset inputs of ``run_id``."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    def entry(ds, context: str, **tags: str) -> DatasetInput:
        all_tags = [InputTag(key=MLFLOW_DATASET_CONTEXT, value=context)]
        all_tags += [InputTag(key=k, value=v) for k, v in tags.items()]
        return DatasetInput(dataset=ds._to_mlflow_entity(), tags=all_tags)

    train, val = fmri_dataset(cfg, "train"), fmri_dataset(cfg, "val")
    stimuli = sorted(set(train.df["stimulus"]) | set(val.df["stimulus"]))
    inputs = [
        entry(train, "training", **{"mirage.input": "fmri"}),
        entry(val, "validation", **{"mirage.input": "fmri"}),
        entry(feature_dataset(cfg, stimuli), "training", **{"mirage.input": "features"}),
    ]
    client(cfg.tracking.uri).log_inputs(run_id, datasets=inputs)


# --------------------------------------------------------------------------- figures


def log_figure(uri: str, run_id: str, figure, name: str, file: str | None = None) -> str:
    """A matplotlib figure as ``figures/<name>/<file or name>.png`` of ``run_id`` (one folder per figure, its
    variants side by side); returns the artifact path."""
    path = f"figures/{name}/{file or name}.png"
    client(uri).log_figure(run_id, figure, path)
    return path
