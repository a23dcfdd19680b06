"""Models and artifacts in an MLflow store: check a model URI, open or download a model, download a run's artifacts.

URIs: ``models:/<name>@<alias>``, ``models:/<name>/<version>[/<path>]``, ``models:/<model id>`` (an MLflow 3
logged model, ``m-...``), ``runs:/<run_id>/<path>`` (a run artifact, or a logged model of the run: a
training run's MLflow model is ``runs:/<run_id>/model``).
A client bound to the given tracking URI resolves them, so neither the global tracking URI nor
the global registry URI is read or changed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import mlflow.artifacts
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mirage.errors import ModelLoadError
from mirage.model_dirs import find_model_dir, is_mlflow_uri
from mirage.predictor import Predictor
from mirage.tracking.runs import client


def _registered(c: MlflowClient, uri: str) -> tuple[str, str, str]:
    """(name, version, path inside the version) of a ``models:/`` URI."""
    ref, _, sub = uri[len("models:/"):].partition("/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return name, str(c.get_model_version_by_alias(name, alias).version), sub
    if sub and sub.split("/")[0].isdigit():
        version, _, rest = sub.partition("/")
        c.get_model_version(ref, version)
        return ref, version, rest
    raise ModelLoadError(f"{uri}: expected models:/<name>@<alias> or models:/<name>/<version>")


def _model_id_location(c: MlflowClient, uri: str) -> str | None:
    """Artifact location of a ``models:/<model id>[/<path>]`` URI (an MLflow 3 logged model, ``m-...``);
    None for a registered-model URI."""
    ref, _, sub = uri[len("models:/"):].partition("/")
    if "@" in ref or not ref.startswith("m-") or (sub and sub.split("/")[0].isdigit()):
        return None
    location = c.get_logged_model(ref).artifact_location.rstrip("/")
    return location + ("/" + sub if sub else "")


def _logged_model_location(c: MlflowClient, run_id: str, path: str) -> str | None:
    """Artifact location of ``path`` inside the logged model of ``run_id`` that its first component names.

    ``runs:/<run_id>/<name>[/...]`` names a logged model (MLflow 3) when the run produced one called
    ``name``; its files live at the model's own artifact location, read here through the client bound
    to the store (MLflow's own ``runs:/`` resolution reads the process-global tracking URI).
    None when the run has no such model.
    """
    name, _, rest = path.strip("/").partition("/")
    if not name:
        return None
    run = c.get_run(run_id)
    token = None
    while True:
        page = c.search_logged_models(
            experiment_ids=[run.info.experiment_id], filter_string=f"name = '{name}'", page_token=token
        )
        for m in page:
            if m.source_run_id == run_id:
                return m.artifact_location.rstrip("/") + ("/" + rest if rest else "")
        token = page.token
        if not token:
            return None


def check_model_uri(uri: str, tracking_uri: str) -> None:
    """``uri`` names a registered version or a run artifact in the store, checked without downloading.

    Raises:
        ModelLoadError: no such run or artifact, no such registered version or alias.
    """
    c = client(tracking_uri)
    try:
        if uri.startswith("models:/"):
            if _model_id_location(c, uri) is None:
                _registered(c, uri)
            return
        run_id, _, path = uri[len("runs:/"):].partition("/")
        if not run_id:
            raise ModelLoadError(f"{uri}: expected runs:/<run_id>/<artifact path>")
        c.get_run(run_id)
        path = path.strip("/")
        if path and not _artifact_exists(c, run_id, path):
            raise ModelLoadError(f"{uri}: run {run_id} has no artifact {path!r}; expected the model's artifact path")
    except MlflowException as e:
        raise ModelLoadError(f"{uri}: not found in MLflow at {tracking_uri} ({_first_line(e.message)})") from None


def download_model(uri: str, tracking_uri: str | None, dst: Path) -> str:
    """Download a ``models:/`` or ``runs:/`` URI into ``dst``; returns the local path."""
    try:
        if uri.startswith("models:/"):
            c = client(tracking_uri) if tracking_uri else MlflowClient()
            location = _model_id_location(c, uri)
            if location is not None:
                return mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(dst), tracking_uri=tracking_uri)
            name, version, sub = _registered(c, uri)
            source = c.get_model_version_download_uri(name, version)
            if sub:
                source = source.rstrip("/") + "/" + sub
            return mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst), tracking_uri=tracking_uri)
        c = client(tracking_uri) if tracking_uri else MlflowClient()
        run_id, _, path = uri[len("runs:/"):].partition("/")
        location = _logged_model_location(c, run_id, path) if run_id else None
        return mlflow.artifacts.download_artifacts(
            artifact_uri=location or uri, dst_path=str(dst), tracking_uri=tracking_uri
        )
    except MlflowException as e:
        raise ModelLoadError(f"{uri}: cannot download from MLflow at {tracking_uri}: {e.message}") from None


def download_run_artifacts(tracking_uri: str, run_id: str, path: str, dst: Path) -> Path | None:
    """The artifact folder or file ``path`` of ``run_id`` downloaded under ``dst``; None when the run has none."""
    try:
        c = client(tracking_uri)
        location = _logged_model_location(c, run_id, path)
        if location is not None:  # a logged model of the run (MLflow 3), e.g. a training run's "model"
            target = dst / path.strip("/")
            target.mkdir(parents=True, exist_ok=True)
            return Path(mlflow.artifacts.download_artifacts(
                artifact_uri=location, dst_path=str(target), tracking_uri=tracking_uri
            ))
        return Path(c.download_artifacts(run_id, path, str(dst)))
    except (MlflowException, OSError):  # no such artifact on that run
        return None


def load_predictor(
    uri: str,
    tracking_uri: str | None = None,
    device: str | torch.device | None = None,
    window_batch: int = 16,
    cache_dir: str | os.PathLike | None = None,
) -> Predictor:
    """A :class:`Predictor` from a local path, ``file://`` URI, ``models:/<name>@<alias>`` or ``runs:/<id>/<path>``.

    MLflow URIs are downloaded (to ``cache_dir``, or a temporary folder removed once the weights
    are in memory) and the model directory is looked up inside the download (e.g. the pyfunc
    model's ``predictor`` artifact).
    """
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if not is_mlflow_uri(uri):
        return Predictor.from_path(uri, device=device, window_batch=window_batch)
    if cache_dir is None:  # weights are read into memory: the download can go right after
        with tempfile.TemporaryDirectory(prefix="mirage-model-") as tmp:
            return load_predictor(uri, tracking_uri, device, window_batch, cache_dir=tmp)
    dst = Path(cache_dir)
    dst.mkdir(parents=True, exist_ok=True)
    local = download_model(uri, tracking_uri, dst)
    predictor = Predictor.from_path(find_model_dir(local), device=device, window_batch=window_batch)
    predictor.source = uri
    return predictor


def _artifact_exists(c: MlflowClient, run_id: str, path: str) -> bool:
    if _logged_model_location(c, run_id, path) is not None:
        return True
    parent, _, name = path.rpartition("/")
    return any(f.path.rstrip("/") == path for f in c.list_artifacts(run_id, parent or None)) or bool(
        c.list_artifacts(run_id, path)
    )


def _first_line(text: str) -> str:
    return str(text).strip().splitlines()[0] if str(text).strip() else ""
