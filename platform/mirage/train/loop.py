"""The per-worker training loop: batch -> step -> schedule -> maybe evaluate -> maybe checkpoint and report.

The loop knows nothing of the launcher. A :class:`Session` (Ray Train, torchrun or a plain
process) says which rank this is, hands over the checkpoint to resume from, and receives
each epoch's metrics with a function that writes this rank's part of the checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from mirage.atomic import write_text
from mirage.config import Config
from mirage.errors import DataError
from mirage.features.store import open_store
from mirage.model import build_model
from mirage.model.export import save_exported
from mirage.train import fsdp
from mirage.train.data import PrefetchLoader, WindowDataset, epoch_plan
from mirage.train.optim import build_grad_scaler, build_optimizer, build_scheduler
from mirage.train.steps import PearsonAccumulator, eval_batch, train_step
from mirage.valpred import predict_validation

STATE_FILE = "trainer_state.pt"
MODEL_DIR = "model"
VAL_R_FILE = "val_r.npy"
COMPLETE_FILE = "COMPLETE"
"""Marker written last into an epoch checkpoint, once every rank's files are on disk."""


def mark_complete(path: Path, epoch: int, world_size: int) -> None:
    """Write ``COMPLETE`` into an epoch checkpoint folder (atomically); call after every rank has written.

    Raises:
        FileNotFoundError: ``path`` does not exist (a checkpoint that was never persisted is not marked).
    """
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{path}: no checkpoint folder to mark complete")
    write_text(Path(path) / COMPLETE_FILE, json.dumps({"epoch": int(epoch), "world_size": int(world_size)}))


def is_complete(path: Path) -> bool:
    """True when the epoch checkpoint in ``path`` carries its ``COMPLETE`` marker."""
    return (Path(path) / COMPLETE_FILE).is_file()


class Session(Protocol):
    """What the loop needs from its launcher."""

    rank: int
    world_size: int
    device: torch.device

    def restore(self) -> contextlib.AbstractContextManager[Path | None]:
        """The latest checkpoint directory (merged over ranks), or None for a fresh run."""

    def report(self, metrics: dict[str, Any], write: Callable[[Path], None]) -> None:
        """Persist one epoch: ``write(dir)`` writes this rank's files; every rank calls this."""


@dataclass
class FitState:
    """What survives a restart besides weights: the schedule position, the best score, the history."""

    epoch: int = -1
    best_val_r: float = float("-inf")
    best_epoch: int = -1
    history: list[dict[str, Any]] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def _all_sum(t: torch.Tensor) -> torch.Tensor:
    if fsdp.is_distributed():
        dist.all_reduce(t)
    return t


def build_for_data(cfg: Config, ds: WindowDataset):
    """The model for this dataset (feature dims, parcels, subjects, output TRs from the data)."""
    return build_model(
        cfg.model,
        feature_dims=ds.feature_dims(),
        n_parcels=ds.n_parcels,
        n_subjects=len(cfg.data.subjects),
        n_output_trs=cfg.data.window_trs,
    )


def export_meta(cfg: Config, ds: WindowDataset) -> dict[str, Any]:
    """``meta.json`` of an exported model."""
    return {
        "feature_dims": {m: list(v) for m, v in ds.feature_dims().items()},
        "n_parcels": ds.n_parcels,
        "n_subjects": len(cfg.data.subjects),
        "n_output_trs": cfg.data.window_trs,
        "subjects": list(cfg.data.subjects),
        "feature_key": ds.store.key,
        "layers": list(ds.layers),
    }


@dataclass
class Validation:
    """One evaluation of the validation split.

    Attributes:
        r: (n_subjects, n_parcels) Pearson r per subject over real fMRI rows.
        r_pooled: (n_parcels,) Pearson r over every row of every window, all subjects pooled.
        loss: masked MSE over real rows.
    """

    r: np.ndarray
    r_pooled: np.ndarray
    loss: float


def evaluate(model, ds: WindowDataset, cfg: Config, session: Session) -> Validation:
    """Validation r per subject (real rows), pooled r (all rows of the split's windows) and the masked MSE."""
    acc = PearsonAccumulator(len(cfg.data.subjects), ds.n_parcels, device=session.device)
    pooled = PearsonAccumulator(1, ds.n_parcels, device=session.device)
    plan = epoch_plan(
        ds.refs, ds.n_parcels, cfg.train.batch_size, session.rank, session.world_size, shuffle=False, seed=0, epoch=0
    )
    sse = torch.zeros((), dtype=torch.float64, device=session.device)
    for items, hb in zip(plan.batches, PrefetchLoader(ds.batch, plan.batches, cfg.train.loader_threads)):
        batch = hb.to(session.device, cfg.model.modalities)
        real = torch.tensor([ok for _, ok in items], dtype=torch.bool, device=session.device)  # (B,)
        sse += eval_batch(model, batch, acc, cfg.train.precision, pooled=pooled, real=real).double()
    _all_sum(acc.sums)
    _all_sum(pooled.sums)
    _all_sum(sse)
    cells = float(acc.sums[0].sum())
    return Validation(acc.compute().cpu().numpy(), pooled.compute()[0].cpu().numpy(), float(sse) / max(cells, 1.0))


def epoch_metrics(cfg: Config, val: Validation, ds: WindowDataset) -> dict[str, float]:
    """``val_r/<subject>``, both selection scores and ``val_r``, the one ``train.selection_metric`` names.

    ``val_r_per_subject``: mean over subjects with validation windows of the mean over parcels;
    ``val_r_pooled``: mean over parcels of the pooled r.
    """
    out: dict[str, float] = {}
    seen = sorted({ref.subject_index for ref in ds.refs})
    for s in seen:
        out[f"val_r/{cfg.data.subjects[s]}"] = float(val.r[s].mean())
    out["val_r_per_subject"] = float(np.mean([out[f"val_r/{cfg.data.subjects[s]}"] for s in seen])) if seen else 0.0
    out["val_r_pooled"] = float(val.r_pooled.mean()) if seen else 0.0
    out["val_r"] = out[f"val_r_{cfg.train.selection_metric}"]
    return out


def train_epoch(model, optimizer, scheduler, ds: WindowDataset, cfg: Config, session: Session, epoch: int,
                scaler: torch.amp.GradScaler | None = None) -> dict:
    """One pass over this rank's share of the training windows; returns the epoch's training metrics."""
    tc = cfg.train
    t0 = time.perf_counter()
    plan = ds.plan(tc.batch_size, shuffle=True, seed=tc.seed, epoch=epoch)
    loader = PrefetchLoader(ds.batch, plan.batches, tc.loader_threads)
    sse = torch.zeros((), dtype=torch.float64, device=session.device)
    for hb, global_cells in zip(loader, plan.cells):
        batch = hb.to(session.device, cfg.model.modalities, pin=True)
        loss_norm = max(global_cells, 1)
        sse += train_step(model, batch, optimizer, loss_norm=loss_norm, grad_clip=tc.grad_clip,
                          precision=tc.precision, scaler=scaler).double()
        scheduler.step()
    seconds = time.perf_counter() - t0
    train_loss = float(_all_sum(sse)) / max(sum(plan.cells), 1)
    if not math.isfinite(train_loss):
        raise FloatingPointError(f"epoch {epoch}: training loss is {train_loss} (lower train.lr or check the inputs)")
    extra = {"loss_scale": float(scaler.get_scale())} if scaler is not None else {}
    return {
        **extra,
        "train_loss": train_loss,
        "lr": float(scheduler.get_last_lr()[0]),
        "epoch_s": seconds,
        "windows_per_s": len(plan.batches) * tc.batch_size / max(seconds, 1e-9),
        "input_wait_frac": loader.wait_s / max(seconds, 1e-9),
        "reader_gb_per_s": loader.bytes * session.world_size / 1e9 / max(seconds, 1e-9),
    }


def checkpoint_writer(cfg, session, ds, model, optimizer, scheduler, state: FitState, *, export: bool,
                      full: dict | None, val_r: np.ndarray | None, scaler=None) -> Callable[[Path], None]:
    """The function that writes this rank's part of the epoch checkpoint into a directory.

    Every rank writes its DCP shard; rank 0 adds the schedule and loop state and, on a new best
    epoch, the exported model and the per-parcel validation r.
    """

    def write(path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        fsdp.save_checkpoint(path, model, optimizer)
        if session.rank != 0:
            return
        saved = {"scheduler": scheduler.state_dict(), "fit_state": json.dumps(state.__dict__)}
        if scaler is not None:
            saved["scaler"] = scaler.state_dict()
        torch.save(saved, path / STATE_FILE)
        if export:
            _export(path / MODEL_DIR, cfg, ds, model, full)
            if val_r is not None:
                np.save(path / VAL_R_FILE, val_r.astype(np.float32))

    return write


def fit(
    cfg: Config,
    session: Session,
    *,
    store=None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    on_val_predictions: Callable[[int, dict[str, dict[str, np.ndarray]]], None] | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` on this rank; returns the summary (history, best val r and epoch).

    Resumes from ``session.restore()`` when it holds a checkpoint. ``on_epoch`` receives each
    epoch's metrics (on every rank; a tracking hook logs on rank 0 only). With
    ``ensemble.epoch_predictions``, ``on_val_predictions(epoch, subject -> run id -> (n_trs, P))``
    receives every epoch's whole-run validation predictions.
    """
    started_at = time.time()
    tc = cfg.train
    store = store if store is not None else open_store(cfg.features)
    train_ds = WindowDataset(cfg, "train", store, rank=session.rank, world_size=session.world_size)
    val_ds = WindowDataset(cfg, "val", store)
    if len(train_ds) == 0:
        raise DataError(f"{cfg.data.root}: the train split {cfg.data.train} has no fMRI windows")

    seed_everything(tc.seed)
    model = build_for_data(cfg, train_ds).to(session.device)
    if fsdp.is_distributed():
        fsdp.shard_model(model, session.device)
    optimizer = build_optimizer(model, tc)
    steps_per_epoch = math.ceil(len(train_ds) / tc.batch_size)
    scheduler = build_scheduler(optimizer, tc, tc.epochs * steps_per_epoch)
    scaler = build_grad_scaler(tc, session.device)

    state = FitState()
    with session.restore() as ckpt:
        if ckpt is not None:
            fsdp.load_checkpoint(ckpt, model, optimizer)
            saved = torch.load(Path(ckpt) / STATE_FILE, weights_only=True)
            scheduler.load_state_dict(saved["scheduler"])
            if scaler is not None and "scaler" in saved:
                scaler.load_state_dict(saved["scaler"])
            state = FitState(**json.loads(saved["fit_state"]))

    start_epoch = state.epoch + 1
    for epoch in range(start_epoch, tc.epochs):
        seed_everything(tc.seed + 1009 * (epoch + 1) + 7919 * session.rank)
        model.seed_modality_dropout(tc.seed + 1009 * (epoch + 1))  # per-batch draws: the same on every rank
        metrics = {"epoch": epoch, "start_epoch": start_epoch}
        metrics.update(train_epoch(model, optimizer, scheduler, train_ds, cfg, session, epoch, scaler))
        r = None
        if len(val_ds):
            val = evaluate(model, val_ds, cfg, session)
            r, metrics["val_loss"] = val.r, val.loss
            metrics.update(epoch_metrics(cfg, val, val_ds))
            if cfg.ensemble.epoch_predictions:  # on every rank: a sharded forward gathers parameters
                preds = predict_validation(model, cfg, val_ds, session.device)
                if on_val_predictions is not None:
                    on_val_predictions(epoch, preds)
        else:
            metrics["val_r"] = 0.0
        is_best = metrics["val_r"] > state.best_val_r
        if is_best:
            state.best_val_r, state.best_epoch = metrics["val_r"], epoch
        metrics.update(best_val_r=state.best_val_r, is_best=int(is_best))
        state.epoch = epoch
        state.history.append(dict(metrics))
        full = fsdp.full_state_dict(model) if is_best and fsdp.is_distributed() else None  # collective
        if on_epoch is not None:
            on_epoch(metrics)
        session.report(metrics, checkpoint_writer(cfg, session, train_ds, model, optimizer, scheduler, state,
                                                  export=is_best, full=full, val_r=r, scaler=scaler))

    return {
        "history": state.history,
        "best_val_r": state.best_val_r,
        "best_epoch": state.best_epoch,
        "epochs": tc.epochs,
        "started_at": started_at,
    }


def _export(path: Path, cfg: Config, ds: WindowDataset, model, full: dict | None) -> None:
    """Save the model (or, when sharded, its gathered full state dict) as an exported directory."""
    save_exported(path, full if full is not None else model, cfg, export_meta(cfg, ds))


class LocalSession:
    """A session without Ray: checkpoints in ``root/epoch_NNNN`` (shared by all ranks), resume from the latest.

    A checkpoint counts only once it carries its ``COMPLETE`` marker, which rank 0 writes after
    every rank has written its files; an epoch folder left half-written by a crash is ignored on
    resume and rewritten from scratch when that epoch is trained again.

    Used by the plain in-process loop (tests, benchmarks) and by ``torchrun`` launches.
    """

    def __init__(self, root: Path, device: torch.device | None = None, resume: bool = True):
        self.root = Path(root)
        self.rank = dist.get_rank() if fsdp.is_distributed() else 0
        self.world_size = dist.get_world_size() if fsdp.is_distributed() else 1
        self.device = device or torch.device("cpu")
        self.resume = resume
        self.reports: list[dict[str, Any]] = []

    def latest(self) -> Path | None:
        """The newest ``epoch_NNNN`` folder marked complete, or None."""
        done = sorted(p for p in self.root.glob("epoch_[0-9][0-9][0-9][0-9]") if is_complete(p))
        return done[-1] if done else None

    def restore(self) -> contextlib.AbstractContextManager[Path | None]:
        latest = self.latest() if self.resume else None
        return contextlib.nullcontext(latest)

    def report(self, metrics: dict[str, Any], write: Callable[[Path], None]) -> None:
        path = self.root / f"epoch_{int(metrics['epoch']):04d}"
        if self.rank == 0 and path.exists():
            shutil.rmtree(path)  # an earlier attempt at this epoch that never completed
        barrier()
        write(path)
        barrier()  # every rank's files are on disk
        if self.rank == 0:
            mark_complete(path, int(metrics["epoch"]), self.world_size)
        self.reports.append(metrics)


def barrier() -> None:
    """Wait for every rank (a no-op without a process group)."""
    if fsdp.is_distributed():
        dist.barrier()
