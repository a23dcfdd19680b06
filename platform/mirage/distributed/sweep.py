"""Ray Tune glue: an Optuna (TPE) + ASHA sweep whose trials each train one model.

Driver layer only: it builds the search space, the Tuner and the trial function. A trial is a
Tune *function* (Train V2 pattern) that applies its sampled values to the base config with
``cfg.with_overrides(params)`` and trains in one of two ways (``sweep.trial_runner``):

- ``direct`` (``auto`` with ``train.num_workers == 1``): :func:`mirage.distributed.train.run_in_trial`
  runs the training loop in the trial process and reports every epoch to Tune; no Ray Train
  controller or worker is started, so a trial costs its training, not a Train start-up.
- ``trainer``: :func:`mirage.distributed.train.run_training` builds a ``TorchTrainer``;
  ``TuneReportCallback`` in that trainer's callbacks forwards every epoch's report to Tune.

Either way ASHA sees each epoch, the trial's MLflow run, checkpoints and exported model are the
same, and the run folder ``<train.storage>/<sweep.name>-<trial id>`` holds its checkpoints.

Resources: a direct trial reserves what its one worker needs (``train.cpus_per_worker``, a GPU
with ``train.use_gpu`` and the custom ``train.worker_resources``, so it lands on the training worker
group); a trainer trial's function is only a driver (``sweep.driver_cpus`` logical CPUs and the
custom ``sweep.driver_resources``, so it lands on the CPU group and not on a GPU node that may go
away; on a cluster whose head offers no CPUs it runs on a worker node, and the Ray Train controller
it starts, which requests no CPUs, runs beside it) and its Train workers reserve their own placement
group from ``ScalingConfig`` (the same CPUs, GPU and custom resources per worker).
Concurrency is capped by ``sweep.max_concurrent`` and, on a local Ray, by what the logical CPUs
can hold, so a trial never waits forever for its workers.

Resume: the Tune state lives in ``<train.storage>/<sweep.name>``; running the same sweep again
restores it with ``Tuner.restore`` (finished trials are kept, unfinished ones restart and resume
from the last complete checkpoint in their run folder, named after the trial id). The MLflow parent run id is kept beside it (``<sweep.name>.mirage.json``, see
:mod:`mirage.distributed.sweep_state`) with the hash of the sweep's defining config: a resume, or a
rerun of a finished sweep, with another config is refused and the differing keys are named.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import optuna
import ray
from ray import tune
from ray.tune import ExperimentAnalysis
from ray.tune.execution.placement_groups import resource_dict_to_pg_factory
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from mirage import tracking
from mirage.analysis import FigureHook
from mirage.atomic import write_text
from mirage.config import Config, ConfigError, ParamSpec
from mirage.distributed import sweep_state
from mirage.distributed.cluster import check_cluster_gpus
from mirage.distributed.train import run_in_trial, run_training
from mirage.errors import MirageError
from mirage.sweep_analysis import write_analysis

TRIAL_TAG = "mirage.trial_id"
SWEEP_TAG = "mirage.sweep"


# --------------------------------------------------------------- search space


def tune_domain(key: str, spec: ParamSpec):
    """One ``ParamSpec`` (bounds checked by the config) -> a Tune distribution (``tune.randint`` is exclusive: high + 1)."""
    if spec.kind == "choice":
        return tune.choice(list(spec.values))
    if spec.kind == "int":
        return tune.randint(int(spec.low), int(spec.high) + 1)
    if spec.kind == "float":
        return tune.uniform(spec.low, spec.high)
    return tune.loguniform(spec.low, spec.high)


def search_space(cfg: Config) -> dict[str, Any]:
    """``cfg.sweep.space`` as a Tune param space keyed by the same dotted paths as ``--set``.

    Every key is checked against the config (a trial with an unknown key would fail late).
    """
    space = {}
    for key, spec in cfg.sweep.space.items():
        space[key] = tune_domain(key, spec)
        probe = spec.values[0] if spec.kind == "choice" and spec.values else spec.low
        if spec.kind == "int" and probe is not None:
            probe = int(probe)
        try:
            cfg.with_overrides({key: probe})
        except ConfigError as e:
            raise ConfigError(f"sweep.space.{key}: not a valid config key or value ({e})") from None
    if not space:
        raise ConfigError("sweep.space is empty: declare at least one dotted key to search")
    return space


# --------------------------------------------------------------------- results


@dataclass
class TrialInfo:
    """One trial as the sweep saw it."""

    trial_id: str
    params: dict[str, Any]
    best: float | None
    epochs: int
    status: str  # TERMINATED | ERROR | ...
    stopped_early: bool = False
    run_id: str | None = None


@dataclass
class SweepResult:
    """A finished (or interrupted) sweep."""

    name: str
    parent_run_id: str
    experiment_path: str
    metric: str
    mode: str
    trials: list[TrialInfo] = field(default_factory=list)
    interrupted: bool = False
    wall_s: float = 0.0

    def ranked(self) -> list[TrialInfo]:
        """Trials that did not fail and reported a metric, best first (a failed trial's config may fail again)."""
        ok = [t for t in self.trials if t.status != "ERROR" and t.best is not None and math.isfinite(t.best)]
        return sorted(ok, key=lambda t: t.best, reverse=self.mode == "max")

    @property
    def best(self) -> TrialInfo | None:
        r = self.ranked()
        return r[0] if r else None

    def save(self, path: str | Path) -> None:
        """Write the result as JSON (atomically)."""
        write_text(path, json.dumps(asdict(self), indent=2, default=str))

    @classmethod
    def load(cls, path: str | Path) -> "SweepResult":
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SweepResult":
        """From a saved dict; keys that are not fields (the sweep state's config, hash) are ignored."""
        names = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        d["trials"] = [TrialInfo(**t) for t in d.get("trials", [])]
        return cls(**d)


def experiment_path(cfg: Config) -> Path:
    """Tune experiment folder of the sweep."""
    return Path(cfg.train.storage) / cfg.sweep.name


def state_path(cfg: Config) -> Path:
    """Side file holding the MLflow parent run id, the config hash and, once done, the trial summary."""
    return sweep_state.state_path(cfg)


def load_sweep(cfg: Config) -> SweepResult:
    """The summary of a sweep that ran to the end with this config, or a clear error."""
    p = state_path(cfg)
    if not p.is_file():
        raise MirageError(f"no finished sweep {cfg.sweep.name!r} under {cfg.train.storage} ({p} missing): run `mirage sweep` first")
    state = sweep_state.read_state(cfg)
    sweep_state.check_same_config(cfg, state)
    res = SweepResult.from_dict(state)
    if not res.trials:
        raise MirageError(f"sweep {cfg.sweep.name!r} ({p}) has no trials recorded: rerun `mirage sweep` to finish it")
    return res


# ------------------------------------------------------------------ the trial


def trial_train_name(sweep_name: str, trial_id: str) -> str:
    """Train run name of a trial: stable across restarts, so its Train run resumes."""
    return f"{sweep_name}-{trial_id}"


def trial_runner(cfg: Config) -> str:
    """``direct`` or ``trainer``: how a trial of ``cfg`` trains (``sweep.trial_runner``, ``auto`` resolved).

    Raises:
        ConfigError: ``direct`` was asked for a training run of several workers.
    """
    runner = cfg.sweep.trial_runner
    if runner == "auto":
        return "direct" if cfg.train.num_workers == 1 else "trainer"
    if runner == "direct" and cfg.train.num_workers != 1:
        raise ConfigError(
            f"sweep.trial_runner=direct with train.num_workers={cfg.train.num_workers}: a direct trial trains "
            "on one worker; expected train.num_workers=1, or sweep.trial_runner=trainer (or auto)"
        )
    return runner


def make_trial_fn(base: dict[str, Any], parent_run_id: str):
    """The Tune function of one trial (a closure over the base config tree and the parent run)."""

    def mirage_trial(params: dict[str, Any]) -> None:
        trial_id = tune.get_context().get_trial_id()
        cfg = Config.model_validate(base).with_overrides(dict(params))
        run = {
            "tracking_parent": parent_run_id,
            "name": trial_train_name(cfg.sweep.name, trial_id),
            "tags": {TRIAL_TAG: trial_id, SWEEP_TAG: cfg.sweep.name},
            "kind": "trial",
        }
        if trial_runner(cfg) == "direct":
            run_in_trial(cfg, **run)
        else:
            run_training(cfg, callbacks=[TuneReportCallback()], **run)

    return mirage_trial


# ------------------------------------------------------------------ resources


def trial_resources(cfg: Config) -> dict[str, float]:
    """What the trial function itself reserves: a direct trial its worker's CPUs, GPU and custom
    resources (``train.worker_resources``), a trainer trial its driver's CPUs and custom resources
    (``sweep.driver_resources``; the Train workers reserve their own)."""
    if trial_runner(cfg) == "direct":
        tc = cfg.train
        return {"cpu": tc.cpus_per_worker, "gpu": 1.0 if tc.use_gpu else 0.0, **tc.worker_resources}
    return {"cpu": cfg.sweep.driver_cpus, **cfg.sweep.driver_resources}


def trial_cpus(cfg: Config) -> float:
    """Logical CPUs one trial holds: a direct trial its worker's, a trainer trial its driver's plus its Train workers'."""
    if trial_runner(cfg) == "direct":
        return cfg.train.cpus_per_worker
    return cfg.sweep.driver_cpus + cfg.train.num_workers * cfg.train.cpus_per_worker


def concurrency(cfg: Config, cluster_cpus: float | None) -> int:
    """Trials at once: ``sweep.max_concurrent``, capped by what ``cluster_cpus`` can hold.

    Raises:
        MirageError: not even one trial fits (it would wait forever for its workers).
    """
    need = trial_cpus(cfg)
    if cluster_cpus is None or need <= 0:
        return cfg.sweep.max_concurrent
    fit = int(cluster_cpus // need)
    if fit < 1:
        raise MirageError(
            f"one trial needs {need:g} logical CPUs (sweep.trial_runner={trial_runner(cfg)}: "
            + ("train.cpus_per_worker" if trial_runner(cfg) == "direct"
               else "sweep.driver_cpus + train.num_workers x train.cpus_per_worker")
            + f") but Ray has {cluster_cpus:g}: raise ray.num_cpus or lower those"
        )
    return min(cfg.sweep.max_concurrent, fit)


# --------------------------------------------------------------------- driver


def asha(cfg: Config):
    """ASHA over epochs whose rungs all lie before the last epoch.

    A trial that reaches its last epoch is never stopped by the scheduler
    (``stop_last_trials=False``, rungs below ``train.epochs``): it returns on its own, so its
    training run exports and logs its model and closes its MLflow run. With one epoch there is
    nothing to stop early (FIFO).
    """
    last_rung = cfg.train.epochs - 1
    if last_rung < 1:
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=last_rung,
        grace_period=min(cfg.sweep.grace_period, last_rung),
        reduction_factor=cfg.sweep.reduction_factor,
        stop_last_trials=False,
    )


def build_tuner(cfg: Config, parent_run_id: str, restore: bool):
    """A fresh Tuner, or one restored from the sweep's saved Tune state."""
    local = not (os.environ.get("RAY_ADDRESS") or cfg.ray.address)
    cpus = ray.cluster_resources().get("CPU") if local else None
    n_conc = concurrency(cfg, cpus)
    base = cfg.to_dict()
    runner = trial_runner(cfg)  # a runner that cannot train this config fails here, not in every trial
    fn = make_trial_fn(base, parent_run_id)

    def resources(params: dict[str, Any]):  # per trial: the space may change the worker count or CPUs
        return resource_dict_to_pg_factory(trial_resources(Config.model_validate(base).with_overrides(dict(params))))

    trainable = tune.with_resources(fn, resources)
    path = experiment_path(cfg)
    if restore:
        return tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True, resume_errored=True)
    sampler = optuna.samplers.TPESampler(seed=cfg.sweep.seed, n_startup_trials=cfg.sweep.n_startup_trials)
    searcher = OptunaSearch(metric=cfg.sweep.metric, mode=cfg.sweep.mode, sampler=sampler)
    scheduler = asha(cfg)
    return tune.Tuner(
        trainable,
        param_space=search_space(cfg),
        tune_config=tune.TuneConfig(
            metric=cfg.sweep.metric,
            mode=cfg.sweep.mode,
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=cfg.sweep.num_samples,
            max_concurrent_trials=n_conc,
        ),
        run_config=tune.RunConfig(
            name=cfg.sweep.name,
            storage_path=str(Path(cfg.train.storage)),
            # a direct trial is its own worker: Tune restarts it from its last checkpoint as Train
            # would restart a trainer trial's workers (which Tune then must not retry again)
            failure_config=tune.FailureConfig(max_failures=cfg.train.max_failures if runner == "direct" else 0),
            verbose=1,
        ),
    )


def saved_trials(cfg: Config) -> list[TrialInfo]:
    """Every trial of the sweep with the status Tune saved last.

    Read back from the experiment state on disk: after a Ctrl-C, Tune stops the running
    trials in memory but the saved state still shows them unfinished (they resume).
    """
    ea = ExperimentAnalysis(str(experiment_path(cfg)), default_metric=cfg.sweep.metric, default_mode=cfg.sweep.mode)
    metric, mode = cfg.sweep.metric, cfg.sweep.mode
    out = []
    for trial in ea.trials:
        df = ea.trial_dataframes.get(trial.trial_id)
        best, epochs = None, 0
        if df is not None and metric in df.columns and len(df):
            col = df[metric].dropna()
            best = float(col.max() if mode == "max" else col.min()) if len(col) else None
            # epochs trained, also across a restart that resumed the trial's Train run
            epochs = int(df["epoch"].max()) + 1 if "epoch" in df.columns else int(df["training_iteration"].max())
        params = {k: v for k, v in (trial.config or {}).items() if k in cfg.sweep.space}
        out.append(
            TrialInfo(
                trial_id=trial.trial_id,
                params=params,
                best=best,
                epochs=epochs,
                status=str(trial.status),
                stopped_early=str(trial.status) == "TERMINATED" and epochs < cfg.train.epochs,
            )
        )
    return out


def run_sweep(cfg: Config) -> SweepResult:
    """Run (or resume) the sweep; Ray must be initialised. Tracks it as an MLflow parent run.

    A sweep that already ran to the end is returned from its saved summary (nothing reruns).
    ``interrupted`` is set when Tune was stopped (Ctrl-C) before every trial finished; running
    the same sweep again resumes it.
    """
    check_cluster_gpus(cfg, "train")  # every trial's Train workers would wait forever for missing GPUs
    t0 = time.time()
    uri = cfg.tracking.uri
    path = experiment_path(cfg)
    restore = tune.Tuner.can_restore(str(path))
    state = sweep_state.read_state(cfg) if restore else {}
    sweep_state.check_same_config(cfg, state)  # resuming, or reusing a finished sweep, needs the same config
    if restore and state.get("trials") and state.get("parent_run_id"):
        return SweepResult.from_dict(state)  # finished before: nothing to rerun
    parent = state.get("parent_run_id") if restore else None
    if parent and tracking.reopen_run(uri, parent):
        tracking.close_stale_children(cfg.tracking, parent)  # trials cut off by the interruption
    else:
        parent = tracking.start_run(cfg, "sweep", cfg.sweep.name, tags={SWEEP_TAG: cfg.sweep.name})
    sweep_state.write_state(cfg, {"parent_run_id": parent})
    status = "FAILED"
    res = SweepResult(cfg.sweep.name, parent, str(path), cfg.sweep.metric, cfg.sweep.mode)
    try:
        build_tuner(cfg, parent, restore).fit()
        res.trials = saved_trials(cfg)
        done = sum(t.status in ("TERMINATED", "ERROR") for t in res.trials)
        res.interrupted = done < cfg.sweep.num_samples
        res.wall_s = time.time() - t0
        runs = tracking.finish_trial_runs(cfg.tracking, parent, res.trials, TRIAL_TAG)
        for t in res.trials:
            t.run_id = runs.get(t.trial_id)
        if res.interrupted:
            status = "KILLED"
            return res
        best = res.best
        if best is None:
            raise MirageError(
                f"sweep {cfg.sweep.name!r}: no trial reported {cfg.sweep.metric!r} "
                f"({[t.status for t in res.trials]}); see the trial logs under {path}"
            )
        with tempfile.TemporaryDirectory() as tmp:
            files = write_sweep_artifacts(cfg, res, Path(tmp),
                                          on_figure=lambda name, fig: tracking.log_figure(uri, parent, fig, name))
            for f in files:
                if f.suffix != ".png":  # the figures are under figures/<name>/
                    tracking.log_artifacts(uri, parent, f, "sweep")
        metrics = {f"best_{cfg.sweep.metric}": best.best, "n_trials": len(res.trials), "wall_s": res.wall_s}
        tracking.log_metrics(uri, parent, metrics, step=0)
        tracking.set_tags(uri, parent, {"mirage.best_trial": best.trial_id, "mirage.best_run": best.run_id or "",
                                        "mirage.config_hash": sweep_state.config_hash(sweep_state.defining_config(cfg))})
        sweep_state.write_state(cfg, asdict(res))
        status = "FINISHED"
        return res
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracking.end_run(uri, parent, status)


# ------------------------------------------------------------------ artifacts


def write_sweep_artifacts(cfg: Config, res: SweepResult, out: Path, on_figure: FigureHook | None = None) -> list[Path]:
    """Best config (YAML), the trial table (JSON), the parameter importance (JSON) and plots of
    the search (PNG) into ``out``; the analysis itself is :mod:`mirage.sweep_analysis`.
    ``on_figure(name, fig)`` sees each plot before it is closed."""
    out.mkdir(parents=True, exist_ok=True)
    cfg.with_overrides(dict(res.best.params)).dump(out / "best_config.yaml")
    (out / "trials.json").write_text(json.dumps([asdict(t) for t in res.trials], indent=2, default=str))
    write_analysis(
        observations(res.trials), cfg.sweep.space,
        name=res.name, metric=res.metric, mode=res.mode, seed=cfg.sweep.seed, out=out, on_figure=on_figure,
    )
    return sorted(out.iterdir())


def observations(trials: list[TrialInfo]) -> list[tuple[dict[str, Any], float | None]]:
    """``(params, best)`` per trial in start order; ``None`` for a trial that errored (its partial
    metric is not an outcome of its parameters)."""
    return [(t.params, None if t.status == "ERROR" else t.best) for t in trials]
