"""MLflow glue: experiments, runs with the platform's tags, params, metrics and artifacts.

Everything goes through an ``MlflowClient`` bound to the absolute ``tracking.uri``; nothing
sets process-global MLflow state, so Ray workers and Tune trials (whose working directory
changes) log to the same store. Tags: ``mirage.kind`` (train, baseline, sweep, trial,
ensemble), ``mirage.code_version``, ``mirage.feature_key``, ``mirage.data_root``; nested runs
carry ``mlflow.parentRunId``. Every run opened here ends with its true status. A registered
ensemble takes the ``ensemble.alias`` (``champion``) only when its held-out score is at least the
current holder's, or when forced (:func:`update_champion`); the decision is tagged on its run.
"""

from __future__ import annotations

import contextlib
import functools
import math
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mirage.config import PROJECT_ROOT, Config, ConfigError, TrackingConfig

KINDS = ("train", "baseline", "sweep", "trial", "ensemble")
_MAX_PARAM_LEN = 6000


def client(uri: str):
    """An ``MlflowClient`` for an absolute tracking URI."""
    from mlflow import MlflowClient

    if not uri:
        raise ConfigError("tracking.uri is empty: resolve the config (mirage.config.resolve_paths) first")
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        raise ConfigError(f"tracking.uri={uri!r}: expected an absolute sqlite URI (sqlite:////abs/path/mlflow.db)")
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The git commit of the project (``+dirty`` with local changes), else the package version."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
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
            from mirage.features.store import store_key

            feature_key = store_key(cfg.features)
        except Exception:  # noqa: BLE001 - the key is informative, a run must not fail for it
            feature_key = "unknown"
    return {
        "mirage.kind": kind,
        "mirage.code_version": code_version(),
        "mirage.feature_key": feature_key,
        "mirage.data_root": cfg.data.root,
    }


def _params(cfg: Config) -> list:
    from mlflow.entities import Param

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
    from mlflow.entities import Metric

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
    """Open (or reopen ``run_id``) a run, yield its id, end it with its true status."""
    if run_id is None or not reopen_run(cfg.tracking.uri, run_id):
        run_id = start_run(cfg, kind, run_name, parent_run_id=parent_run_id, tags=tags)
    try:
        yield run_id
    except BaseException as e:
        end_run(cfg.tracking.uri, run_id, status_for(e))
        raise
    end_run(cfg.tracking.uri, run_id, "FINISHED")


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


def log_pyfunc_model(
    cfg: Config, run_id: str, predictor_dir: str | Path, *, score: float | None = None, metric: str = "ensemble_r"
) -> str:
    """Log and register ``predictor_dir`` (:func:`register_pyfunc_model`), then :func:`update_champion`.

    Returns the registered version.
    """
    version = register_pyfunc_model(cfg, run_id, predictor_dir)
    update_champion(cfg, run_id, version, score, metric=metric)
    return version


def register_pyfunc_model(cfg: Config, run_id: str, predictor_dir: str | Path) -> str:
    """Log ``predictor_dir`` as one pyfunc model on ``run_id`` and register it; no alias moves.

    Registered under ``cfg.ensemble.registry_name``, the version tagged ``mirage.run_id``. The
    run keeps its status (the caller ends it). Returns the registered version.
    """
    import mlflow

    from mirage.pyfunc import MiragePyfunc, pip_requirements

    uri = cfg.tracking.uri
    c = client(uri)
    status = c.get_run(run_id).info.status
    # restore what the process had: an unset URI stays unset (not pinned to its resolved default)
    tracking_before = mlflow.get_tracking_uri() if mlflow.tracking.is_tracking_uri_set() else None
    registry_before = mlflow.get_registry_uri()
    registry_before = None if registry_before == mlflow.get_tracking_uri() else registry_before
    mlflow.set_tracking_uri(uri)  # the fluent log_model needs it; restored below
    mlflow.set_registry_uri(uri)
    try:
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=MiragePyfunc(),
                artifacts={"predictor": str(predictor_dir)},
                code_paths=[str(Path(__file__).resolve().parent)],
                pip_requirements=pip_requirements(),
            )
        version = mlflow.register_model(info.model_uri, cfg.ensemble.registry_name).version
    finally:
        c.update_run(run_id, status=status)  # leaving the fluent run must not end ours
        mlflow.set_tracking_uri(tracking_before)
        mlflow.set_registry_uri(registry_before)
    c.set_model_version_tag(cfg.ensemble.registry_name, version, "mirage.run_id", run_id)
    return str(version)


# ------------------------------------------------------------------- champion alias

SCORE_TAG = "mirage.heldout_score"
"""Model version tag: the held-out score the version was compared with (``mirage.heldout_metric`` names it)."""


@dataclass
class ChampionDecision:
    """Whether a new version took the alias, and why (recorded as ``mirage.champion_*`` run tags)."""

    promoted: bool
    reason: str
    alias: str
    version: str
    score: float | None
    previous_version: str | None = None
    previous_score: float | None = None

    def tags(self) -> dict[str, str]:
        def fmt(v):
            return "none" if v is None else str(v)

        return {
            "mirage.champion_decision": "promoted" if self.promoted else "kept",
            "mirage.champion_reason": self.reason,
            "mirage.champion_alias": self.alias,
            "mirage.champion_score": fmt(self.score),
            "mirage.champion_previous_version": fmt(self.previous_version),
            "mirage.champion_previous_score": fmt(self.previous_score),
        }


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def decide_champion(score: float | None, current: float | None, has_current: bool, promote: bool,
                    metric: str = "ensemble_r") -> tuple[bool, str]:
    """(move the alias?, why): only when the new held-out score is at least the current one's, or forced."""
    if promote:
        return True, "forced (--promote / ensemble.promote)"
    if not has_current:
        return True, "no current champion"
    if not _finite(score):
        return False, f"the new version has no held-out {metric}; pass --promote to move the alias"
    if not _finite(current):
        return False, f"the current champion has no held-out {metric} to compare with; pass --promote to move the alias"
    if score >= current:
        return True, f"held-out {metric} {score:.6g} >= champion's {current:.6g}"
    return False, f"held-out {metric} {score:.6g} < champion's {current:.6g}"


def current_champion(uri: str, name: str, alias: str, metric: str) -> tuple[str, float | None] | None:
    """(version, held-out score) of the version holding ``alias`` under ``name``, None when none does.

    The score is the version's ``mirage.heldout_score`` tag, else its run's ``metric``, else None.
    """
    c = client(uri)
    try:
        mv = c.get_model_version_by_alias(name, alias)
    except Exception:  # noqa: BLE001 - no registered model, or no version holds the alias
        return None
    raw = (mv.tags or {}).get(SCORE_TAG)
    if raw is None and mv.run_id:
        try:
            raw = c.get_run(mv.run_id).data.metrics.get(metric)
        except Exception:  # noqa: BLE001 - the run was deleted: no score to compare with
            raw = None
    try:
        score = float(raw) if raw is not None else None
    except ValueError:
        score = None
    return str(mv.version), score


def update_champion(cfg: Config, run_id: str, version: str, score: float | None, *,
                    metric: str = "ensemble_r", promote: bool | None = None) -> ChampionDecision:
    """Move ``cfg.ensemble.alias`` to ``version`` when its held-out ``score`` is at least the champion's.

    ``promote`` (default ``cfg.ensemble.promote``) moves it regardless. The score is tagged on the
    version (``mirage.heldout_score``, ``mirage.heldout_metric``); the decision, both scores and the
    previous version are tagged on ``run_id`` (``mirage.champion_*``).
    """
    uri, name, alias = cfg.tracking.uri, cfg.ensemble.registry_name, cfg.ensemble.alias
    promote = cfg.ensemble.promote if promote is None else promote
    c = client(uri)
    if _finite(score):
        c.set_model_version_tag(name, version, SCORE_TAG, repr(float(score)))
    c.set_model_version_tag(name, version, "mirage.heldout_metric", metric)
    current = current_champion(uri, name, alias, metric)
    if current is not None and current[0] == str(version):
        current = None
    moved, reason = decide_champion(score, current[1] if current else None, current is not None, promote, metric)
    if moved:
        c.set_registered_model_alias(name, alias, version)
    decision = ChampionDecision(
        moved, reason, alias, str(version), float(score) if score is not None else None,
        current[0] if current else None, current[1] if current else None,
    )
    set_tags(uri, run_id, decision.tags())
    return decision
