"""Ray Train glue: a ``TorchTrainer`` running :func:`mirage.train.loop.fit` on every worker.

Two layers, as in Ray's own templates: :func:`run_training` (driver) builds the Ray objects,
opens the MLflow run and collects the result; :func:`train_worker` (per worker) only reads its
context, runs the plain-torch loop, and reports each epoch with its distributed checkpoint.
Rebuilding the trainer with the same storage path and name resumes from its latest checkpoint.
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

from mirage.config import Config
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
_NOT_IN_RUN_NAME = (  # where a run goes and what runs after it; none of these change the trained model
    "train.name", "train.storage", "train.max_failures", "train.loader_threads", "train.baseline.",
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


def train_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Per-worker entry point: ``config = {"cfg": Config dict, "tracking": {"uri", "run_id"} | None}``."""
    cfg = Config.model_validate(config["cfg"])
    session = RaySession(cfg.train.use_gpu, config.get("run_dir"))
    on_epoch = on_val_predictions = None
    if config.get("tracking") and session.rank == 0:
        from mirage.tracking.predictions import EpochPredictionLogger
        from mirage.tracking import EpochLogger

        on_epoch = EpochLogger(config["tracking"]["uri"], config["tracking"]["run_id"])
        on_val_predictions = EpochPredictionLogger(config["tracking"]["uri"], config["tracking"]["run_id"])
    return fit(cfg, session, on_epoch=on_epoch, on_val_predictions=on_val_predictions)


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
            resources_per_worker={"CPU": tc.cpus_per_worker, **({"GPU": 1} if tc.use_gpu else {})},
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
    # MLflow only on the driver: every Train worker imports this module too
    from mirage import tracking as trk

    init_ray(cfg.ray)
    check_cluster_gpus(cfg, "train")  # a GPU request the cluster can never meet would wait forever
    name = name or run_name(cfg)
    run_dir = Path(cfg.train.storage) / name
    trainer_cbs = list(callbacks or []) + list(run_config_callbacks or [])
    if not track:
        result = build_trainer(cfg, name=name, run_config_callbacks=trainer_cbs).fit()
        return _result(result, name, None)

    previous = _previous_mlflow_run(run_dir, cfg.tracking.uri)
    with trk.tracked_run(cfg, kind, name, parent_run_id=tracking_parent, tags=tags, run_id=previous) as run_id:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / MLFLOW_RUN_FILE).write_text(json.dumps({"run_id": run_id, "uri": cfg.tracking.uri}))
        trainer = build_trainer(
            cfg, name=name, run_config_callbacks=trainer_cbs, tracking={"uri": cfg.tracking.uri, "run_id": run_id}
        )
        out = _result(trainer.fit(), name, run_id)
        if out.model_dir:
            trk.log_artifacts(cfg.tracking.uri, run_id, out.model_dir, "model")
        if out.val_r_path:
            trk.log_artifacts(cfg.tracking.uri, run_id, out.val_r_path, "validation")
        trk.log_metrics(cfg.tracking.uri, run_id, {"best_val_r": out.best_val_r, "best_epoch": out.best_epoch}, step=0)
        return out


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
