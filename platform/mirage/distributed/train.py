"""Ray Train glue: a ``TorchTrainer`` running :func:`mirage.train.loop.fit` on every worker.

Two layers, as in Ray's own templates: :func:`run_training` (driver) builds the Ray objects,
opens the MLflow run and collects the result; :func:`train_worker` (per worker) only reads its
context, runs the plain-torch loop, and reports each epoch with its distributed checkpoint.
Rebuilding the trainer with the same storage path and name resumes from its latest checkpoint.

:func:`run_in_trial` runs the same loop in the calling process, for a Tune trial whose training
fits one worker: :class:`TuneSession` writes each epoch's checkpoint into the run folder with the
layout a Train run leaves there (``<train.storage>/<name>/epoch_NNNN``, marked ``COMPLETE``, the
best and the latest kept) and reports the epoch to Tune. Both paths share the MLflow run handling
(:func:`tracked_training`, :func:`log_outputs`), so a run resumes from either path's checkpoints.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from torch.distributed.checkpoint import FileSystemReader

from mirage.config import Config, ConfigError
from mirage.distributed.cluster import check_cluster_gpus, init_ray
from mirage.train.loop import (
    MODEL_DIR,
    STATE_FILE,
    VAL_R_FILE,
    barrier,
    fit,
    is_complete,
    mark_complete,
)

MLFLOW_RUN_FILE = "mlflow_run.json"
CHECKPOINT_PATH_KEY = "checkpoint_path"
"""Result key naming an epoch's checkpoint folder (the key ``TuneReportCallback`` uses)."""
_NOT_IN_RUN_NAME = (  # where a run goes and what runs after it; none of these change the trained model
    "train.name", "train.storage", "train.max_failures", "train.loader_threads", "train.worker_resources",
    "train.baseline.",
    "tracking.", "ray.", "outputs", "serve.", "sweep.", "ensemble.",
)


@dataclass
class TrainResult:
    """What a training run produced.

    Attributes:
        best_val_r: best validation score ``val_r`` (the one ``train.selection_metric`` names).
        best_epoch: epoch of the best validation r.
        model_dir: exported best model (``model.safetensors``, ``config.yaml``, ``meta.json``).
        val_r_path: per-parcel validation r of the best epoch, ``(n_subjects, n_parcels)`` .npy.
        mlflow_run_id: the MLflow run, or None when tracking was off.
        history: per-epoch metrics, from the first epoch (also those before a resume).
        path: the run's folder in Ray storage.
        name: the run's name (folder in ``train.storage``).
    """

    best_val_r: float
    best_epoch: int
    model_dir: str | None
    val_r_path: str | None
    mlflow_run_id: str | None
    history: list[dict[str, Any]] = field(default_factory=list)
    path: str = ""
    name: str = ""


def run_name(cfg: Config) -> str:
    """``cfg.train.name``, or ``train-<hash>`` of every setting that changes the result."""
    if cfg.train.name:
        return cfg.train.name
    flat = {k: v for k, v in cfg.flat().items() if not k.startswith(_NOT_IN_RUN_NAME)}
    digest = hashlib.sha1(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"train-{digest}"


class RaySession:
    """:class:`mirage.train.loop.Session` inside a Ray Train worker."""

    def __init__(self, use_gpu: bool, run_dir: str | None = None):
        self.run_dir = Path(run_dir) if run_dir else None

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        if use_gpu and torch.cuda.is_available():
            self.device = ray.train.torch.get_device()
        else:
            self.device = torch.device("cpu")

    def restore(self):
        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            return _as_path(ckpt.as_directory())
        # A worker that dies right after persisting a checkpoint can take its report with it
        # before the controller registers it; a checkpoint marked complete is whole all the same.
        return contextlib.nullcontext(latest_complete_checkpoint(self.run_dir) if self.run_dir else None)

    def report(self, metrics: dict[str, Any], write) -> None:
        """Persist this rank's files through ``ray.train.report``, then rank 0 marks the folder complete.

        ``ray.train.report`` returns on a rank once its own files are uploaded; after a barrier every
        rank's are, and rank 0 writes ``COMPLETE`` into the persisted ``<run_dir>/epoch_NNNN``.
        A folder left there by an earlier attempt at the same epoch is removed first.
        """
        name = f"epoch_{int(metrics['epoch']):04d}"
        persisted = self.run_dir / name if self.run_dir else None
        if persisted is not None and self.rank == 0 and persisted.exists():
            shutil.rmtree(persisted)
        barrier()
        with tempfile.TemporaryDirectory(prefix="mirage-ckpt-") as d:
            write(Path(d))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=name)
        barrier()
        if persisted is not None and self.rank == 0 and persisted.is_dir():
            mark_complete(persisted, int(metrics["epoch"]), self.world_size)


class TuneSession:
    """:class:`mirage.train.loop.Session` of one rank running inside a Ray Tune trial function.

    Checkpoints go to ``run_dir/epoch_NNNN`` (marked ``COMPLETE`` once written); like a Train run
    with ``CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="val_r")``, the folder of the
    best epoch (the newest holding an exported model) and the latest one are kept. Each epoch's
    metrics then go to ``ray.tune.report`` with the checkpoint's path under ``checkpoint_path``, as
    ``TuneReportCallback`` forwards a Train run's reports, so the scheduler sees every epoch after
    its checkpoint is on disk. Resume reads the newest complete folder, whichever path wrote it.
    """

    rank = 0
    world_size = 1

    def __init__(self, use_gpu: bool, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        if use_gpu and torch.cuda.is_available():
            # Ray sets CUDA_VISIBLE_DEVICES to the trial's GPU: the first visible one is ours
            self.device = torch.device("cuda", 0)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")

    def restore(self):
        return contextlib.nullcontext(latest_complete_checkpoint(self.run_dir))

    def report(self, metrics: dict[str, Any], write) -> None:
        from ray import tune

        path = self.run_dir / f"epoch_{int(metrics['epoch']):04d}"
        if path.exists():
            shutil.rmtree(path)  # an earlier attempt at this epoch
        write(path)
        mark_complete(path, int(metrics["epoch"]), self.world_size)
        prune_checkpoints(self.run_dir)
        tune.report({**metrics, CHECKPOINT_PATH_KEY: str(path)})


def best_export_dir(run_dir: Path) -> Path | None:
    """The newest complete ``epoch_NNNN`` folder under ``run_dir`` holding an exported model (the best epoch)."""
    for d in sorted(run_dir.glob("epoch_[0-9][0-9][0-9][0-9]"), reverse=True):
        if is_complete(d) and (d / MODEL_DIR).is_dir():
            return d
    return None


def prune_checkpoints(run_dir: Path) -> list[Path]:
    """Remove every ``epoch_NNNN`` folder but the latest complete one and the best export; returns those removed."""
    latest = latest_complete_checkpoint(run_dir)
    if latest is None:
        return []
    keep = {latest, best_export_dir(run_dir)}
    gone = [d for d in sorted(run_dir.glob("epoch_[0-9][0-9][0-9][0-9]")) if d not in keep and d.name < latest.name]
    for d in gone:
        shutil.rmtree(d, ignore_errors=True)
    return gone


def latest_complete_checkpoint(run_dir: Path) -> Path | None:
    """The newest ``epoch_NNNN`` folder under ``run_dir`` marked ``COMPLETE`` whose every shard is on disk.

    The marker is written last (:meth:`RaySession.report`), so a folder without it may be
    missing files of any rank, the exported model or the loop state.
    """
    for d in sorted(run_dir.glob("epoch_[0-9][0-9][0-9][0-9]"), reverse=True):
        if not is_complete(d) or not (d / STATE_FILE).is_file() or not (d / ".metadata").is_file():
            continue
        try:
            files = {s.relative_path for s in FileSystemReader(str(d)).read_metadata().storage_data.values()}
        except Exception:  # a half-written metadata file: not complete
            continue
        if all((d / f).is_file() for f in files):
            return d
    return None


@contextlib.contextmanager
def _as_path(cm):
    with cm as d:
        yield Path(d)


def tracking_hooks(tracking: dict[str, str] | None, rank: int) -> dict[str, Any]:
    """``fit``'s ``on_epoch`` / ``on_val_predictions`` logging into the MLflow run ``tracking`` names (rank 0 only)."""
    if not tracking or rank != 0:
        return {}
    from mirage.tracking import EpochLogger
    from mirage.tracking.predictions import EpochPredictionLogger

    return {
        "on_epoch": EpochLogger(tracking["uri"], tracking["run_id"]),
        "on_val_predictions": EpochPredictionLogger(tracking["uri"], tracking["run_id"]),
    }


def train_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Per-worker entry point: ``config = {"cfg": Config dict, "tracking": {"uri", "run_id"} | None}``."""
    cfg = Config.model_validate(config["cfg"])
    session = RaySession(cfg.train.use_gpu, config.get("run_dir"))
    return fit(cfg, session, **tracking_hooks(config.get("tracking"), session.rank))


def build_trainer(
    cfg: Config,
    *,
    name: str,
    run_config_callbacks: list | None = None,
    tracking: dict[str, str] | None = None,
):
    """The ``TorchTrainer`` of one run (also usable inside a Tune trial function)."""
    tc = cfg.train
    return TorchTrainer(
        train_worker,
        train_loop_config={"cfg": cfg.to_dict(), "tracking": tracking, "run_dir": str(Path(tc.storage) / name)},
        scaling_config=ScalingConfig(
            num_workers=tc.num_workers,
            use_gpu=tc.use_gpu,
            resources_per_worker={
                "CPU": tc.cpus_per_worker, **({"GPU": 1} if tc.use_gpu else {}), **tc.worker_resources
            },
        ),
        run_config=RunConfig(
            name=name,
            storage_path=tc.storage,
            failure_config=FailureConfig(max_failures=tc.max_failures),
            # the best checkpoint by validation r, plus always the latest (to resume from)
            checkpoint_config=CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute="val_r", checkpoint_score_order="max"
            ),
            callbacks=list(run_config_callbacks or []),
        ),
    )


def _best_export(result) -> tuple[str | None, str | None]:
    """The exported model dir and val-r file of the best retained checkpoint holding an export."""
    cands = []
    for ckpt, metrics in result.best_checkpoints or []:
        p = Path(ckpt.path)
        if (p / MODEL_DIR).is_dir():
            cands.append((metrics.get("val_r", float("-inf")), p))
    if not cands:
        return None, None
    _, best = max(cands, key=lambda c: c[0])
    val_r = best / VAL_R_FILE
    return str(best / MODEL_DIR), (str(val_r) if val_r.is_file() else None)


def run_training(
    cfg: Config,
    *,
    callbacks: list | None = None,
    tracking_parent: str | None = None,
    name: str | None = None,
    run_config_callbacks: list | None = None,
    tags: dict[str, str] | None = None,
    kind: str = "train",
    track: bool = True,
) -> TrainResult:
    """Train ``cfg`` with Ray Train (FSDP2 over ``cfg.train.num_workers`` workers), tracked in MLflow.

    Args:
        cfg: resolved config (absolute paths).
        callbacks, run_config_callbacks: Ray Train ``UserCallback`` objects for the trainer's
            ``RunConfig`` (e.g. Tune's ``TuneReportCallback`` inside a trial function).
        tracking_parent: MLflow run id to nest this run under (``mlflow.parentRunId``).
        name: run folder in ``cfg.train.storage`` (default :func:`run_name`); the same name resumes.
        tags: extra MLflow tags; ``kind``: the ``mirage.kind`` tag (``train`` or ``trial``).
        track: open an MLflow run (``False``: Ray only).
    """
    init_ray(cfg.ray)
    check_cluster_gpus(cfg, "train")  # a GPU request the cluster can never meet would wait forever
    name = name or run_name(cfg)
    trainer_cbs = list(callbacks or []) + list(run_config_callbacks or [])
    if not track:
        result = build_trainer(cfg, name=name, run_config_callbacks=trainer_cbs).fit()
        return _result(result, name, None)

    with tracked_training(cfg, name, kind=kind, tracking_parent=tracking_parent, tags=tags) as tracking:
        trainer = build_trainer(cfg, name=name, run_config_callbacks=trainer_cbs, tracking=tracking)
        out = _result(trainer.fit(), name, tracking["run_id"])
        log_outputs(cfg, out)
        return out


def run_in_trial(
    cfg: Config,
    *,
    name: str,
    tracking_parent: str | None = None,
    tags: dict[str, str] | None = None,
    kind: str = "trial",
) -> TrainResult:
    """Train ``cfg`` on one rank in this process (a Tune trial function), tracked like :func:`run_training`.

    Every epoch is reported to Tune through :class:`TuneSession`; the run folder
    ``<train.storage>/<name>`` holds the checkpoints, so the same name resumes from the latest.

    Raises:
        ConfigError: ``cfg.train.num_workers`` is not 1.
    """
    if cfg.train.num_workers != 1:
        raise ConfigError(
            f"train.num_workers={cfg.train.num_workers}: a training run inside the trial process has one "
            "worker; expected train.num_workers=1 or sweep.trial_runner=trainer"
        )
    run_dir = Path(cfg.train.storage) / name
    with tracked_training(cfg, name, kind=kind, tracking_parent=tracking_parent, tags=tags) as tracking:
        session = TuneSession(cfg.train.use_gpu, run_dir)
        summary = fit(cfg, session, **tracking_hooks(tracking, session.rank))
        best = best_export_dir(run_dir)
        val_r = best / VAL_R_FILE if best is not None else None
        out = TrainResult(
            best_val_r=float(summary["best_val_r"]),
            best_epoch=int(summary["best_epoch"]),
            model_dir=str(best / MODEL_DIR) if best is not None else None,
            val_r_path=str(val_r) if val_r is not None and val_r.is_file() else None,
            mlflow_run_id=tracking["run_id"],
            history=list(summary["history"]),
            path=str(run_dir),
            name=name,
        )
        log_outputs(cfg, out)
        return out


@contextlib.contextmanager
def tracked_training(cfg: Config, name: str, *, kind: str, tracking_parent: str | None, tags: dict[str, str] | None):
    """The MLflow run of training run ``name``: yields ``{"uri", "run_id"}``, closes it with its true status.

    An earlier, unfinished attempt at the same run (its id saved in ``<run folder>/mlflow_run.json``)
    is reopened, so a resumed run keeps one MLflow run.
    """
    # MLflow only where a run is opened: every Train worker imports this module too
    from mirage import tracking as trk

    run_dir = Path(cfg.train.storage) / name
    previous = _previous_mlflow_run(run_dir, cfg.tracking.uri)
    with trk.tracked_run(cfg, kind, name, parent_run_id=tracking_parent, tags=tags, run_id=previous) as run_id:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / MLFLOW_RUN_FILE).write_text(json.dumps({"run_id": run_id, "uri": cfg.tracking.uri}))
        if run_id != previous:  # a resumed run logged its inputs when it was opened
            trk.log_dataset_inputs(cfg, run_id)
        yield {"uri": cfg.tracking.uri, "run_id": run_id}


def log_outputs(cfg: Config, out: TrainResult) -> None:
    """Log a finished run's exported model as its MLflow model ``model`` (``runs:/<run_id>/model``), per-parcel
    validation r (``validation``) and best score."""
    from mirage import tracking as trk

    uri, run_id = cfg.tracking.uri, out.mlflow_run_id
    if out.model_dir:
        trk.log_trained_model(uri, run_id, out.model_dir)
    if out.val_r_path:
        trk.log_artifacts(uri, run_id, out.val_r_path, "validation")
    trk.log_metrics(uri, run_id, {"best_val_r": out.best_val_r, "best_epoch": out.best_epoch}, step=0)


def _previous_mlflow_run(run_dir: Path, uri: str) -> str | None:
    """The MLflow run of an earlier, unfinished attempt at the same training run (resumed into)."""
    f = run_dir / MLFLOW_RUN_FILE
    if not f.is_file():
        return None
    try:
        saved = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    return saved.get("run_id") if saved.get("uri") == uri else None


def _result(result, name: str, run_id: str | None) -> TrainResult:
    summary = result.return_value or {}
    model_dir, val_r_path = _best_export(result)
    return TrainResult(
        best_val_r=float(summary.get("best_val_r", float("nan"))),
        best_epoch=int(summary.get("best_epoch", -1)),
        model_dir=model_dir,
        val_r_path=val_r_path,
        mlflow_run_id=run_id,
        history=list(summary.get("history", [])),
        path=str(result.path),
        name=name,
    )
