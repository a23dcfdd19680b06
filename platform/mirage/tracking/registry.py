"""The model registry: log an ensemble or model directory as one pyfunc model, register it, and
move the champion alias only when the new version's held-out score is at least the holder's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mirage.config import Config
from mirage.tracking.runs import client, set_tags

PACKAGE_DIR = Path(__file__).resolve().parent.parent
"""The ``mirage`` package folder, shipped with every logged model as its code."""


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
    # defining the PythonModel subclass makes MLflow inspect and warn about it: only logging needs it
    from mirage.tracking.pyfunc import MiragePyfunc, pip_requirements

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
                code_paths=[str(PACKAGE_DIR)],
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
