"""Ray Tune glue of a declared experiment: a grid search whose every trial is one trial of the spec.

Driver layer only. The param space is one ``tune.grid_search`` over the pending trials
(:meth:`mirage.experiments.spec.ExperimentSpec.trials`); Tune runs them in parallel across the
cluster, at most ``sweep.max_concurrent`` at once (fewer where the logical CPUs cannot hold them).
Each Tune trial:

- a model trial trains through the sweep's trial runner (:func:`mirage.distributed.sweep.trial_runner`:
  ``direct`` in the trial process with one worker, else a ``TorchTrainer`` run), as a ``trial`` MLflow
  run nested under the experiment's parent run; then its exported model is scored on every split
  with fMRI (:func:`mirage.experiments.scoring.score_models`);
- a baseline trial fits the ridge baseline (:func:`mirage.baselines.fit_baseline`) as a ``baseline`` run
  under the same parent.

Every child run carries the experiment, method, group (table row), trial key, grid point and seed as
tags, the scores as metrics (``r_<split>``, ``r_<split>/<subject>``) and ``experiment/scores.npz``.
A trial is done once its run is FINISHED with the tag ``mirage.experiment_scored`` and the hash of its
defining config: rerunning the experiment skips those trials (:func:`pending_trials`), and a model
trial cut off mid-training resumes from its checkpoints (its Train folder is named after the trial).
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.execution.placement_groups import resource_dict_to_pg_factory
from ray.tune.integration.ray_train import TuneReportCallback

from mirage import tracking
from mirage.config import Config
from mirage.distributed import sweep_state
from mirage.distributed.cluster import check_cluster_gpus
from mirage.distributed.sweep import concurrency, trial_resources, trial_runner
from mirage.distributed.train import run_in_trial, run_training
from mirage.errors import MirageError
from mirage.experiments.scoring import Scores, add_attention, add_probes, baseline_scores, score_models
from mirage.experiments.spec import ExperimentSpec, TrialPlan, format_value

EXPERIMENT_TAG = "mirage.experiment"
TRIAL_KEY_TAG = "mirage.experiment_trial"
GROUP_TAG = "mirage.experiment_group"
METHOD_TAG = "mirage.method"
SEED_TAG = "mirage.seed"
HASH_TAG = "mirage.trial_config_hash"
SCORED_TAG = "mirage.experiment_scored"
GRID_TAG = "mirage.grid."
"""Prefix of one tag per grid key (``mirage.grid.model.modalities = text+audio``)."""
SCORES_DIR = "experiment"
SCORES_FILE = "scores.npz"


# ------------------------------------------------------------------ tags, hashes


def trial_hash(cfg: Config, plan: TrialPlan) -> str:
    """Hash of what defines the trial's result: its config (less where things go and how fast) and its method."""
    defining = {k: v for k, v in sweep_state.defining_config(cfg).items() if not k.startswith("sweep.")}
    if plan.kind == "baseline":
        defining.update({k: v for k, v in cfg.flat().items() if k.startswith("train.baseline.")})
    defining["_trial"] = [plan.method, plan.kind, plan.baseline]
    return sweep_state.config_hash(defining)


def trial_tags(cfg: Config, plan: TrialPlan) -> dict[str, str]:
    """The tags that place a child run in the experiment's table."""
    tags = {
        EXPERIMENT_TAG: plan.experiment, TRIAL_KEY_TAG: plan.key, GROUP_TAG: plan.group, METHOD_TAG: plan.method,
        SEED_TAG: "" if plan.seed is None else str(plan.seed), HASH_TAG: trial_hash(cfg, plan),
    }
    tags.update({GRID_TAG + k: format_value(v) for k, v in plan.point.items()})
    return tags


def log_scores(uri: str, run_id: str, scores: Scores) -> None:
    """The scores as metrics (MLflow compares runs on them) and ``experiment/scores.npz``; then the scored tag."""
    tracking.log_metrics(uri, run_id, scores.summary(), step=0)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / SCORES_FILE).write_bytes(scores.to_bytes())
        tracking.log_artifacts(uri, run_id, Path(d) / SCORES_FILE, SCORES_DIR)
    tracking.set_tags(uri, run_id, {SCORED_TAG: "1", "mirage.splits_missing": ",".join(scores.missing)})


# --------------------------------------------------------------------- trials


def _model_trial(cfg: Config, plan: TrialPlan, parent: str, splits: list[str], extras: set[str]) -> dict[str, float]:
    from mirage.features.store import open_store
    from mirage.predictor import Predictor

    run = {"tracking_parent": parent, "name": plan.run_name, "tags": trial_tags(cfg, plan), "kind": "trial"}
    if trial_runner(cfg) == "direct":
        res = run_in_trial(cfg, **run)
    else:
        res = run_training(cfg, callbacks=[TuneReportCallback()], **run)
    if not res.model_dir:
        raise MirageError(f"experiment trial {plan.key}: training left no exported model under {res.path}")
    try:
        # a GPU where this process sees one (a direct trial holds its worker's; a trainer trial's driver none)
        predictor = Predictor.from_path(res.model_dir, window_batch=cfg.serve.window_batch)
        store = open_store(cfg.features)
        scores = score_models(cfg, [predictor], store, splits)
        if "probes" in extras:
            add_probes(scores, predictor, cfg)
        if "attention" in extras and cfg.model.layer_pool == "cross_attention":
            add_attention(scores, predictor, cfg, store)
        log_scores(cfg.tracking.uri, res.mlflow_run_id, scores)
    except BaseException as e:  # the run trained but is not a result of the experiment: say so
        tracking.end_run(cfg.tracking.uri, res.mlflow_run_id, tracking.status_for(e))
        raise
    return {"best_val_r": res.best_val_r, **scores.summary()}


def _baseline_trial(cfg: Config, plan: TrialPlan, parent: str, splits: list[str], extras: set[str]) -> dict[str, float]:
    from mirage.baselines import fit_baseline

    tags = {**trial_tags(cfg, plan), "mirage.baseline": plan.baseline}
    with tracking.tracked_run(cfg, "baseline", plan.run_name, parent_run_id=parent, tags=tags) as run_id:
        res = fit_baseline(cfg, plan.baseline)
        tracking.log_metrics(cfg.tracking.uri, run_id, {"val_r": res.val_r, "val_r_official": res.val_r_official}, step=0)
        scores = baseline_scores(cfg, list(cfg.data.subjects), res.r, splits)
        log_scores(cfg.tracking.uri, run_id, scores)
    return scores.summary()


def make_trial_fn(base: dict[str, Any], parent_run_id: str, splits: list[str], extras: set[str] = frozenset()):
    """The Tune function of one experiment trial (a closure over the base config tree and the parent run).

    ``extras``: what else each trained model records beside its scores: ``probes`` (every stage
    probed, :mod:`mirage.probes`), ``attention`` (layer attention views of a cross-attention model).
    """

    def experiment_trial(params: dict[str, Any]) -> None:
        plan = TrialPlan.from_dict(params["trial"])
        cfg = Config.model_validate(base).with_overrides(plan.overrides)
        run = _baseline_trial if plan.kind == "baseline" else _model_trial
        tune.report({"scored": 1, **run(cfg, plan, parent_run_id, splits, set(extras))})

    return experiment_trial


def _resources(cfg: Config, plan: TrialPlan) -> dict[str, float]:
    if plan.kind == "baseline":
        return {"cpu": cfg.train.cpus_per_worker}
    return trial_resources(cfg)


# ------------------------------------------------------------------ parent run


def find_parent(cfg: Config, name: str) -> Any | None:
    """The latest ``experiment`` run named ``name`` in ``tracking.experiment`` (an MLflow Run), or None."""
    c = tracking.client(cfg.tracking.uri)
    exp = c.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        return None
    runs = c.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`mirage.kind` = 'experiment' and tags.`{EXPERIMENT_TAG}` = '{name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def done_trials(cfg: Config, parent_run_id: str) -> dict[str, set[str]]:
    """Trial key -> config hashes of its FINISHED, scored child runs under the parent."""
    out: dict[str, set[str]] = {}
    for run in tracking.child_runs(cfg.tracking, parent_run_id):
        tags = run.data.tags
        if run.info.status == "FINISHED" and tags.get(SCORED_TAG) == "1" and TRIAL_KEY_TAG in tags:
            out.setdefault(tags[TRIAL_KEY_TAG], set()).add(tags.get(HASH_TAG, ""))
    return out


def pending_trials(cfg: Config, trials: list[TrialPlan], parent_run_id: str | None) -> list[TrialPlan]:
    """The trials without a finished, scored run of the same defining config under the parent."""
    if parent_run_id is None:
        return list(trials)
    done = done_trials(cfg, parent_run_id)
    return [t for t in trials if trial_hash(cfg.with_overrides(t.overrides), t) not in done.get(t.key, set())]


# --------------------------------------------------------------------- driver


@dataclass
class GridResult:
    """What one experiment run did.

    Attributes:
        parent_run_id: the experiment's MLflow parent run.
        trained: keys of the trials run this time; ``skipped``: keys already done before.
        failed: trial key -> error line; ``interrupted``: keys of trials cut off (rerun to resume them).
    """

    parent_run_id: str
    trained: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    interrupted: list[str] = field(default_factory=list)
    wall_s: float = 0.0


def open_parent(cfg: Config, spec: ExperimentSpec) -> tuple[str, bool]:
    """The parent run of the experiment: the latest one reopened (RUNNING until the caller ends it), or a
    new one; (run id, reopened)."""
    prev = find_parent(cfg, spec.name)
    if prev is not None and prev.info.lifecycle_stage == "active":
        run_id = prev.info.run_id
        tracking.client(cfg.tracking.uri).update_run(run_id, status="RUNNING")  # ended again by the caller
        tracking.close_stale_children(cfg.tracking, run_id)  # trials cut off by an interruption
        return run_id, True
    run_id = tracking.start_run(cfg, "experiment", spec.name, tags={EXPERIMENT_TAG: spec.name})
    return run_id, False


def run_grid(cfg: Config, spec: ExperimentSpec, parent_run_id: str, trials: list[TrialPlan]) -> GridResult:
    """Run the pending ``trials`` of ``spec`` as one Tune grid search; Ray must be initialised.

    Trials already done under ``parent_run_id`` are skipped (no Ray work when none is left).
    """
    t0 = time.time()
    pending = pending_trials(cfg, trials, parent_run_id)
    pending_keys = {t.key for t in pending}
    res = GridResult(parent_run_id, skipped=[t.key for t in trials if t.key not in pending_keys])
    if not pending:
        return res
    if any(t.kind == "model" for t in pending):
        check_cluster_gpus(cfg, "train")
    base = cfg.to_dict()
    first = cfg.with_overrides(pending[0].overrides)
    local = not (os.environ.get("RAY_ADDRESS") or cfg.ray.address)  # a cluster autoscales: no cap from its CPUs now
    n_conc = concurrency(first, ray.cluster_resources().get("CPU") if local else None)
    fn = make_trial_fn(base, parent_run_id, list(spec.splits), extras={"probes", "attention"} & set(spec.report.figures))

    def resources(params: dict[str, Any]):
        plan = TrialPlan.from_dict(params["trial"])
        return resource_dict_to_pg_factory(_resources(Config.model_validate(base).with_overrides(plan.overrides), plan))

    tuner = tune.Tuner(
        tune.with_resources(fn, resources),
        param_space={"trial": tune.grid_search([t.to_dict() for t in pending])},
        tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=n_conc),
        run_config=tune.RunConfig(
            name=f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=str(Path(cfg.train.storage) / "experiments"),
            # a direct trial is its own worker (Tune retries it); a trainer trial's workers are retried by Train
            failure_config=tune.FailureConfig(
                max_failures=cfg.train.max_failures if trial_runner(first) == "direct" else 0
            ),
            verbose=1,
        ),
    )
    grid = tuner.fit()
    for r in grid:
        key = TrialPlan.from_dict(r.config["trial"]).key
        if r.error is not None:
            res.failed[key] = str(r.error).strip().splitlines()[-1] if str(r.error).strip() else type(r.error).__name__
    # done = scored in MLflow; a trial neither done nor failed was cut off (Ctrl-C stops Tune, which returns)
    left = {t.key for t in pending_trials(cfg, trials, parent_run_id)}
    res.trained = [t.key for t in pending if t.key not in left]
    res.interrupted = [t.key for t in pending if t.key in left and t.key not in res.failed]
    # a trial whose function failed or was stopped after its run opened: close what is left RUNNING
    tracking.close_stale_children(cfg.tracking, parent_run_id, status="KILLED" if res.interrupted else "FAILED")
    res.wall_s = time.time() - t0
    return res

