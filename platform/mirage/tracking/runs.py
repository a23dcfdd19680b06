"""MLflow glue: experiments, runs with the platform's tags, params, metrics and artifacts.

Everything goes through an ``MlflowClient`` bound to the absolute ``tracking.uri``; nothing
sets process-global MLflow state, so Ray workers and Tune trials (whose working directory
changes) log to the same store. Tags: ``mirage.kind`` (train, baseline, sweep, trial,
ensemble, experiment), ``mirage.code_version``, ``mirage.feature_key``, ``mirage.data_root``; nested runs
carry ``mlflow.parentRunId``. Every run opened here ends with its true status.
"""

from __future__ import annotations

import contextlib
import functools
import getpass
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mirage.config import PROJECT_ROOT, Config, ConfigError, TrackingConfig
from mirage.features.store import store_key
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

KINDS = ("train", "baseline", "sweep", "trial", "ensemble", "experiment")
_MAX_PARAM_LEN = 6000


def client(uri: str) -> MlflowClient:
    """An ``MlflowClient`` for an absolute tracking URI."""
    if not uri:
        raise ConfigError("tracking.uri is empty: resolve the config (mirage.config.resolve_paths) first")
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        raise ConfigError(f"tracking.uri={uri!r}: expected an absolute sqlite URI (sqlite:////abs/path/mlflow.db)")
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The git commit of the project checkout, None outside a git checkout."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha or None


def source_tags() -> dict[str, str]:
    """MLflow's standard source tags: ``mlflow.source.name`` (the command), ``mlflow.source.type`` (LOCAL),
    ``mlflow.source.git.commit`` (in a git checkout) and ``mlflow.user``."""
    argv = [Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python", *sys.argv[1:2]]
    tags = {"mlflow.source.name": " ".join(argv), "mlflow.source.type": "LOCAL"}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):  # no user name for this uid (some containers)
        pass
    return tags


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The git commit of the project (``+dirty`` with local changes), else the package version."""
    try:
        sha = git_commit()
        if sha is None:
            raise OSError("not a git checkout")
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return "mirage-platform==" + version("mirage-platform")
        except PackageNotFoundError:
            return "unknown"


def artifact_root(uri: str) -> str | None:
    """Artifact location for a sqlite store: ``mlartifacts/`` beside the database (absolute)."""
    if uri.startswith("sqlite:///"):
        return str(Path(uri[len("sqlite:///"):]).parent / "mlartifacts")
    return None


def ensure_experiment(cfg: TrackingConfig) -> str:
    """The id of ``cfg.experiment``, created (once, on the driver) when missing."""
    c = client(cfg.uri)
    exp = c.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(cfg.experiment, artifact_location=artifact_root(cfg.uri))
    except Exception:  # created concurrently by another driver
        exp = c.get_experiment_by_name(cfg.experiment)
        if exp is None:
            raise
        return exp.experiment_id


def run_tags(cfg: Config, kind: str, feature_key: str | None = None) -> dict[str, str]:
    """The platform tags of a run."""
    if kind not in KINDS:
        raise ValueError(f"mirage.kind {kind!r}: expected one of {KINDS}")
    if feature_key is None:
        try:
            feature_key = store_key(cfg.features)
        except Exception:  # noqa: BLE001 - the key is informative, a run must not fail for it
            feature_key = "unknown"
    return {
        **source_tags(),
        "mirage.kind": kind,
        "mirage.code_version": code_version(),
        "mirage.feature_key": feature_key,
        "mirage.data_root": cfg.data.root,
    }


def _params(cfg: Config) -> list:
    out = []
    for k, v in cfg.flat().items():
        s = str(v)
        out.append(Param(k, s if len(s) <= _MAX_PARAM_LEN else s[: _MAX_PARAM_LEN - 3] + "..."))
    return out


def start_run(
    cfg: Config,
    kind: str,
    run_name: str,
    *,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    feature_key: str | None = None,
) -> str:
    """Open a run with the platform tags, ``cfg.flat()`` as params and the resolved config as an artifact."""
    c = client(cfg.tracking.uri)
    exp_id = ensure_experiment(cfg.tracking)
    all_tags = run_tags(cfg, kind, feature_key)
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    all_tags.update(tags or {})
    run = c.create_run(exp_id, run_name=run_name, tags=all_tags)
    run_id = run.info.run_id
    params = _params(cfg)
    for i in range(0, len(params), 100):
        c.log_batch(run_id, params=params[i : i + 100])
    log_config(cfg, run_id)
    return run_id


def reopen_run(uri: str, run_id: str) -> bool:
    """Mark an unfinished run RUNNING again (a resumed training run); False when it cannot continue."""
    c = client(uri)
    try:
        run = c.get_run(run_id)
    except Exception:  # noqa: BLE001 - deleted or from another store
        return False
    if run.info.status == "FINISHED" or run.info.lifecycle_stage != "active":
        return False
    c.update_run(run_id, status="RUNNING")
    return True


def log_config(cfg: Config, run_id: str) -> None:
    """The resolved config as ``config.yaml`` at the run's artifact root."""
    with tempfile.TemporaryDirectory() as d:
        cfg.dump(Path(d) / "config.yaml")
        client(cfg.tracking.uri).log_artifact(run_id, str(Path(d) / "config.yaml"))


def log_metrics(uri: str, run_id: str, metrics: dict[str, Any], step: int) -> None:
    """Numeric entries of ``metrics`` at ``step`` (one batch call)."""
    ts = int(time.time() * 1000)
    batch = [
        Metric(k, float(v), ts, step)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
    ]
    if batch:
        client(uri).log_batch(run_id, metrics=batch)


def log_artifacts(uri: str, run_id: str, local: str | Path, artifact_path: str | None = None) -> None:
    """A file or a directory as run artifacts."""
    local = Path(local)
    c = client(uri)
    if local.is_dir():
        c.log_artifacts(run_id, str(local), artifact_path)
    else:
        c.log_artifact(run_id, str(local), artifact_path)


def end_run(uri: str, run_id: str, status: str) -> None:
    """Close the run with ``FINISHED``, ``FAILED`` or ``KILLED``."""
    client(uri).set_terminated(run_id, status=status)


def status_for(exc: BaseException | None) -> str:
    """The MLflow status a run ends with after ``exc`` (None = success)."""
    if exc is None:
        return "FINISHED"
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return "KILLED"
    return "FAILED"


@contextlib.contextmanager
def tracked_run(
    cfg: Config,
    kind: str,
    run_name: str,
    *,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    run_id: str | None = None,
) -> Iterator[str]:
    """Open (or reopen ``run_id``) a run, yield its id, end it with its true status.

    Training runs (kinds ``train`` and ``trial``) log system metrics while open when
    ``tracking.system_metrics`` is on.
    """
    resumed = run_id is not None and reopen_run(cfg.tracking.uri, run_id)
    if not resumed:
        run_id = start_run(cfg, kind, run_name, parent_run_id=parent_run_id, tags=tags)
    monitor = system_metrics_monitor(cfg, run_id, resumed) if kind in ("train", "trial") else None
    try:
        yield run_id
    except BaseException as e:
        _stop(monitor)
        end_run(cfg.tracking.uri, run_id, status_for(e))
        raise
    _stop(monitor)
    end_run(cfg.tracking.uri, run_id, "FINISHED")


def system_metrics_monitor(cfg: Config, run_id: str, resumed: bool = False):
    """MLflow's system metrics monitor, started on ``run_id`` (None when ``tracking.system_metrics`` is off).

    Samples every ``tracking.system_metrics_interval_s`` seconds in a thread of this process and
    logs ``system/...`` metrics (one step per sample, continuing the steps of a resumed run).
    """
    if not cfg.tracking.system_metrics:
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(
        run_id, sampling_interval=cfg.tracking.system_metrics_interval_s, resume_logging=resumed,
        tracking_uri=cfg.tracking.uri,
    )
    monitor.start()
    return monitor


def _stop(monitor) -> None:
    if monitor is not None:
        monitor.finish()


class EpochLogger:
    """Per-epoch metrics of a training run, logged from rank 0 only (picklable for Ray workers)."""

    KEYS_PREFIX = ("train_loss", "val_loss", "val_r", "lr", "epoch_s", "windows_per_s", "input_wait_frac")

    def __init__(self, uri: str, run_id: str):
        self.uri = uri
        self.run_id = run_id

    def __call__(self, metrics: dict[str, Any], rank: int = 0) -> None:
        if rank != 0:
            return
        keep = {k: v for k, v in metrics.items() if k.startswith(self.KEYS_PREFIX)}
        log_metrics(self.uri, self.run_id, keep, step=int(metrics["epoch"]))


# =====================================================================================
# Sweeps and ensembles: trial runs under a sweep run, their final status, the registry.
# =====================================================================================


def set_tags(uri: str, run_id: str, tags: dict[str, Any]) -> None:
    """Set (or overwrite) tags on a run."""
    c = client(uri)
    for k, v in tags.items():
        c.set_tag(run_id, k, str(v))


def child_runs(cfg: TrackingConfig, parent_run_id: str) -> list:
    """Runs whose ``mlflow.parentRunId`` is ``parent_run_id``, oldest first."""
    runs = client(cfg.uri).search_runs(
        [ensure_experiment(cfg)],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
        max_results=10000,
        order_by=["attributes.start_time ASC"],
    )
    return list(runs)


def close_stale_children(cfg: TrackingConfig, parent_run_id: str, status: str = "KILLED") -> int:
    """Close the parent's children still RUNNING (their process is gone); returns how many."""
    n = 0
    for run in child_runs(cfg, parent_run_id):
        if run.info.status == "RUNNING":
            end_run(cfg.uri, run.info.run_id, status)
            n += 1
    return n


def finish_trial_runs(cfg: TrackingConfig, parent_run_id: str, trials: list, trial_tag: str) -> dict[str, str]:
    """Give every trial run its true status once Tune returns; returns trial id -> latest run id.

    ``trials`` carry ``trial_id``, ``status`` (Tune's) and ``stopped_early``. A trial that
    errored is FAILED; one that ASHA stopped early is KILLED (tag ``mirage.stopped_by=asha``);
    a completed one FINISHED; one cut off by an interruption KILLED (it restarts on resume).
    """
    by_trial = {t.trial_id: t for t in trials}
    latest: dict[str, str] = {}
    for run in child_runs(cfg, parent_run_id):
        t = by_trial.get(run.data.tags.get(trial_tag, ""))
        if t is None:
            continue
        latest[t.trial_id] = run.info.run_id
        tags = {"mirage.trial_status": t.status}
        if t.stopped_early:
            tags["mirage.stopped_by"] = "asha"
        set_tags(cfg.uri, run.info.run_id, tags)
        if t.stopped_early and t.status == "TERMINATED" and run.info.status != "KILLED":
            end_run(cfg.uri, run.info.run_id, "KILLED")  # the stop may have surfaced as a failure in the trial
        elif run.info.status == "RUNNING":
            if t.status == "ERROR":
                status = "FAILED"
            elif t.status == "TERMINATED" and not t.stopped_early:
                status = "FINISHED"
            else:
                status = "KILLED"
            end_run(cfg.uri, run.info.run_id, status)
    return latest
