"""Checks a command runs before it starts Ray: each fails in seconds with one ``MirageError``.

A failing check creates nothing: no output folder, no Ray session, no MLflow run. Each check is
a small function of the resolved config; :func:`preflight` runs the ones a command needs::

    preflight(cfg, {"tracking", "gpus", "data", "features"}, gpus_for="train")

Checks (the names ``needs`` takes):

- ``tracking``: the MLflow store can be written (sqlite/file: the file or its nearest existing
  folder is writable) or reached (http(s): ``GET <uri>/health`` answers within a few seconds);
- ``gpus``: the GPUs the job asks for (:func:`gpus_needed`) are present on this machine
  (``torch.cuda.device_count()``); on a Ray cluster the same check runs once connected, against
  what the cluster can ever provide (:func:`mirage.distributed.cluster.cluster_gpus`);
- ``data``: ``data.root`` is a dataset in the Algonauts 2025 layout with fMRI of every
  ``data.subjects`` entry and runs in the training and validation splits;
- ``features``: the feature store of ``features.*`` exists, was written with these extraction
  parameters and holds every stimulus the training and validation runs need;
- ``model``: the model URI names a model: a local model directory, or a ``runs:/<id>/<path>``,
  ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` URI whose MLflow store exists (a
  local store's file) or answers (a server); the entry itself is looked up by
  :func:`mirage.pipeline.predict.check_model`, still before Ray starts;
- ``port``: on a local Ray, ``serve.host:serve.port`` can be listened on (no other process holds
  it); on a cluster the proxies bind on its nodes, where a clash is reported by Serve.

Neither Ray nor MLflow here.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from mirage.config import Config
from mirage.data.layout import Release
from mirage.data.splits import split_runs
from mirage.errors import (
    DataError,
    FeatureStoreError,
    ModelLoadError,
    ResourceError,
    TrackingError,
)
from mirage.features.store import open_store
from mirage.model_dirs import is_mlflow_uri, model_kind
from mirage.ports import check_port_free

CHECKS = ("tracking", "gpus", "data", "features", "model", "port")
"""Every check, in the order :func:`preflight` runs them."""
GPU_USES = ("train", "extract", "serve", "predict")
TRAINING_SPLITS = ("train", "val")
HTTP_TIMEOUT_S = 5.0
NVIDIA_PROC = "/proc/driver/nvidia/gpus"
ROCM_DEV = "/dev/kfd"


def preflight(
    cfg: Config,
    needs: Iterable[str],
    *,
    model_uri: str | None = None,
    gpus_for: str = "train",
    splits: Iterable[str] = TRAINING_SPLITS,
) -> None:
    """Run the checks named in ``needs`` (a subset of :data:`CHECKS`) on a resolved config.

    Args:
        cfg: resolved config (absolute paths).
        needs: check names; unknown names are a programming error (``ValueError``).
        model_uri: the model the command loads (required by ``model``).
        gpus_for: which GPU request ``gpus`` checks (one of :data:`GPU_USES`).
        splits: the splits whose runs ``data`` and ``features`` require (default train and val).

    Raises:
        MirageError: the first failing check, its message naming what, where and what was expected.
    """
    needs, splits = set(needs), tuple(splits)
    unknown = needs - set(CHECKS)
    if unknown:
        raise ValueError(f"preflight checks {sorted(unknown)}: expected names from {CHECKS}")
    if "tracking" in needs:
        check_tracking(cfg.tracking.uri)
    if "gpus" in needs:
        check_gpus(cfg, gpus_for)
    if "data" in needs:
        check_dataset(cfg, splits)
    if "features" in needs:
        check_features(cfg, splits)
    if "model" in needs:
        if model_uri is None:
            raise ValueError("preflight 'model' needs model_uri")
        check_model(model_uri, cfg.tracking.uri)
    if "port" in needs and not on_cluster(cfg):
        check_port_free(cfg.serve.host, cfg.serve.port, "serve.port")


def on_cluster(cfg: Config) -> bool:
    """True when Ray is a cluster (``ray.address`` set, or a job with ``RAY_ADDRESS``)."""
    return bool(os.environ.get("RAY_ADDRESS") or cfg.ray.address)


# ------------------------------------------------------------------ GPUs


def gpus_needed(cfg: Config, use: str) -> float:
    """GPUs a job must hold at once to make progress.

    ``train``: one per Train worker when ``train.use_gpu``; ``extract``: ``features.actors`` x
    ``features.gpus_per_actor``; ``serve``: ``serve.replicas`` x ``serve.gpus_per_replica``;
    ``predict``: ``serve.predict_actors`` x ``serve.gpus_per_replica``.
    """
    if use == "train":
        return float(cfg.train.num_workers) if cfg.train.use_gpu else 0.0
    if use == "extract":
        return cfg.features.actors * cfg.features.gpus_per_actor
    if use == "serve":
        return cfg.serve.replicas * cfg.serve.gpus_per_replica
    if use == "predict":
        return cfg.serve.predict_actors * cfg.serve.gpus_per_replica
    raise ValueError(f"GPU use {use!r}: expected one of {GPU_USES}")


_GPU_SETTINGS = {  # use -> (the settings that ask, how to run without GPUs)
    "train": ("train.use_gpu=true with train.num_workers={n:g} (one GPU per worker)",
              "set train.use_gpu=false to train on CPUs"),
    "extract": ("features.actors x features.gpus_per_actor", "set features.gpus_per_actor=0 to extract on CPUs"),
    "serve": ("serve.replicas x serve.gpus_per_replica", "set serve.gpus_per_replica=0 to serve on CPUs"),
    "predict": ("serve.predict_actors x serve.gpus_per_replica", "set serve.gpus_per_replica=0 to predict on CPUs"),
}


def local_gpus() -> int:
    """CUDA devices this process sees (``CUDA_VISIBLE_DEVICES`` applies).

    0 without importing torch when devices are hidden (``CUDA_VISIBLE_DEVICES`` empty or -1) or
    no GPU driver is loaded on Linux (neither ``/proc/driver/nvidia/gpus`` nor ROCm's ``/dev/kfd``).
    """
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return 0
    if sys.platform.startswith("linux") and not Path(NVIDIA_PROC).is_dir() and not Path(ROCM_DEV).exists():
        return 0
    import torch

    return int(torch.cuda.device_count())


def check_gpus(cfg: Config, use: str, present: float | None = None, where: str | None = None) -> None:
    """Fail when the job asks for more GPUs than ``present`` (default: this machine's).

    On a Ray cluster (and without ``present``) nothing is checked here: the cluster is only known
    once connected, where the caller passes :func:`mirage.distributed.cluster.cluster_gpus`.

    Raises:
        ResourceError: naming the setting, the GPUs requested and the GPUs present.
    """
    need = gpus_needed(cfg, use)
    if need <= 0:
        return
    if present is None:
        if on_cluster(cfg):
            return
        present, where = local_gpus(), where or "this machine"
    if need > present:
        asks, fix = _GPU_SETTINGS[use]
        raise ResourceError(
            f"{asks.format(n=need)} asks for {need:g} GPUs, but {where or 'Ray'} has {present:g}; expected at most "
            f"{present:g} (the job would wait for them forever): {fix}"
        )


# ------------------------------------------------------------------ MLflow


def check_tracking(uri: str, timeout_s: float = HTTP_TIMEOUT_S) -> None:
    """The MLflow store at ``uri`` can be written (local store) or answers (server).

    Raises:
        TrackingError: the store's file or folder is not writable, or the server does not answer.
    """
    if uri.startswith(("http://", "https://")):
        _check_server(uri, timeout_s)
        return
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
    elif uri.startswith("file://"):
        path = Path(uri[len("file://"):])
    elif "://" not in uri and uri:
        path = Path(uri)
    else:
        return  # another backend (databricks, postgresql, ...): its client reports its own errors
    _check_writable(path, uri)


def _check_writable(path: Path, uri: str) -> None:
    if path.exists():
        if not os.access(path, os.W_OK):
            raise TrackingError(f"tracking.uri={uri}: {path} is not writable; expected an MLflow store this user can write")
        return
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise TrackingError(
            f"tracking.uri={uri}: cannot create {path} ({parent} is not a writable folder); "
            "expected a writable location for the MLflow store"
        )


def _check_server(uri: str, timeout_s: float) -> None:
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            status = resp.status
    except urllib.error.HTTPError as e:
        status = e.code
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise TrackingError(
            f"tracking.uri={uri}: MLflow server not reachable ({reason}); expected a server answering GET {url} "
            f"within {timeout_s:g} s"
        ) from None
    if status >= 500:
        raise TrackingError(f"tracking.uri={uri}: GET {url} answered HTTP {status}; expected a healthy MLflow server")


# ------------------------------------------------------------------ dataset and features


def check_dataset(cfg: Config, splits: Iterable[str] = TRAINING_SPLITS) -> None:
    """``data.root`` holds the Algonauts layout, fMRI of every subject and runs in each split.

    Raises:
        DataError: naming the folder, the subjects or the split that is missing.
    """
    root = Path(cfg.data.root)
    if not root.is_dir():
        raise DataError(
            f"data.root={root}: no such folder; expected a dataset in the Algonauts 2025 layout (fmri/, stimuli/movies/)"
        )
    absent = [d for d in ("fmri", "stimuli/movies") if not (root / d).is_dir()]
    if absent:
        raise DataError(
            f"data.root={root}: {', '.join(absent)} missing; expected the Algonauts 2025 layout (fmri/, stimuli/movies/)"
        )
    release = Release(root)
    have = set(release.subjects())
    missing = [s for s in cfg.data.subjects if s not in have]
    if missing:
        raise DataError(
            f"{root / 'fmri'}: no fMRI files for {missing} (data.subjects); expected fmri/<subject>/func/*_bold.h5, "
            f"found subjects {sorted(have)}"
        )
    for split in splits:
        if not split_runs(release, cfg.data, split):
            raise DataError(
                f"data.root={root}: no fMRI run in the {split} split (data.{split}={getattr(cfg.data, split)}); "
                "expected at least one run of a subject in data.subjects"
            )


def training_stimuli(cfg: Config, splits: Iterable[str] = TRAINING_SPLITS) -> list[str]:
    """Sorted stimulus ids of the runs of ``splits`` for ``data.subjects``."""
    release = Release(cfg.data.root)
    subjects = set(cfg.data.subjects)
    return sorted({r.stimulus_id for s in splits for r in split_runs(release, cfg.data, s) if r.subject in subjects})


def check_features(cfg: Config, splits: Iterable[str] = TRAINING_SPLITS) -> None:
    """The feature store of ``features.*`` exists, matches its parameters and holds every needed stimulus.

    Raises:
        FeatureStoreError: the store is missing, was written with other parameters, or lacks stimuli.
    """
    store = open_store(cfg.features)
    needed = training_stimuli(cfg, splits)
    missing = [s for s in needed if not store.has(s)]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise FeatureStoreError(
            f"feature store {store.root}: no features for {len(missing)} of the {len(needed)} stimuli the "
            f"{'/'.join(splits)} runs need ({shown}); expected all of them: run `mirage extract`"
        )


# ------------------------------------------------------------------ model


def check_model(uri: str, tracking_uri: str) -> None:
    """``uri`` is a model directory :func:`mirage.tracking.load_predictor` can load, or an MLflow URI
    whose store is there (the entry in it: :func:`mirage.pipeline.predict.check_model`).

    Raises:
        ModelLoadError: no model directory there; no MLflow store at ``tracking_uri``.
        TrackingError: the MLflow server at ``tracking_uri`` does not answer.
    """
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if not is_mlflow_uri(uri):
        model_kind(uri)
        return
    if tracking_uri.startswith(("http://", "https://")):
        _check_server(tracking_uri, HTTP_TIMEOUT_S)  # the client's own retries on a dead server take minutes
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///"):]).is_file():
        raise ModelLoadError(
            f"{uri}: no MLflow store at {tracking_uri} (tracking.uri); expected the store the model was logged to"
        )
