"""Pure training and evaluation steps: masked MSE, one optimiser step, streaming Pearson r.

Padded rows (beyond the edges of a run) carry ``mask == False``; they enter neither the
loss nor the per-subject correlation. The pooled correlation (the reference's selection
score) takes every row of every window of the split, padded rows included.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import torch
from torch import nn

from mirage.train.batch import Batch


def masked_sse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of squared errors over the real rows.

    Args:
        pred: (B, T, P) predictions.
        target: (B, T, P) fMRI.
        mask: (B, T) bool, True where the row is real fMRI.
    Returns:
        scalar float32 tensor.
    """
    err = (pred.float() - target.float()) ** 2  # (B, T, P)
    return (err * mask.unsqueeze(-1).to(err.dtype)).sum()


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the real rows and every parcel (scalar)."""
    n = mask.sum().clamp_min(1) * pred.shape[-1]
    return masked_sse(pred, target, mask) / n


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype of ``train.precision`` on ``device``: bf16 (``'bf16'``, ``'auto'`` on a GPU),
    float16 (``'fp16'``), or None (``'fp32'``, ``'auto'`` on a CPU)."""
    if precision == "fp16":
        return torch.float16
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to :func:`autocast_dtype` of ``precision`` on ``device``, or a no-op."""
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _unscale(scaler, optimizer: torch.optim.Optimizer) -> None:
    """``scaler.unscale_``. On sharded (DTensor) gradients DTensor reduces the one-element inf flag over the
    mesh, warning that it wraps a plain tensor: intended here, so that warning is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Found a non-scalar tensor with numel=1")
        scaler.unscale_(optimizer)


def train_step(
    model: nn.Module,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    *,
    loss_norm: float,
    grad_clip: float,
    precision: str = "fp32",
    clip_fn: Callable[[list[torch.Tensor], float], torch.Tensor] | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> torch.Tensor:
    """One optimiser step on one batch (the caller advances the schedule).

    ``loss_norm`` is the number of real (row, parcel) cells of the whole global batch, so that
    gradients summed over ranks (as :func:`mirage.train.fsdp.shard_model` reduces them) equal the
    gradient of the global masked MSE, whatever the split of padded rows between ranks.
    With a ``scaler`` (fp16) the loss is scaled before backward, gradients are unscaled before
    clipping, and a step whose gradients hold an inf or NaN is skipped (the scale then shrinks).
    Returns the detached sum of squared errors of this rank's rows (for logging).
    """
    model.train()
    device = batch.fmri.device
    with autocast_context(device, precision):
        pred = model(batch.features, batch.subject_id)  # (B, T, P)
    sse = masked_sse(pred, batch.fmri, batch.mask)
    loss = sse / loss_norm
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        params = [p for p in model.parameters() if p.grad is not None]
        (clip_fn or nn.utils.clip_grad_norm_)(params, grad_clip)
        optimizer.step()
        return sse.detach()
    scaler.scale(loss).backward()
    _unscale(scaler, optimizer)
    params = [p for p in model.parameters() if p.grad is not None]
    (clip_fn or nn.utils.clip_grad_norm_)(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return sse.detach()


class PearsonAccumulator:
    """Per-subject, per-parcel Pearson r over all real rows seen, from running sums.

    Sums are float64 and can be added across ranks (``all_reduce`` of :attr:`sums`), so the
    validation r of a sharded evaluation equals that of a single process.
    """

    N_STATS = 6  # n, sum x, sum y, sum xx, sum yy, sum xy

    def __init__(self, n_subjects: int, n_parcels: int, device: torch.device | str = "cpu"):
        self.sums = torch.zeros(self.N_STATS, n_subjects, n_parcels, dtype=torch.float64, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, subject_id: torch.Tensor) -> None:
        """Add a batch: pred, target (B, T, P); mask (B, T) bool; subject_id (B,) long."""
        x = pred.detach().double()
        y = target.detach().double()
        m = mask.to(torch.float64).unsqueeze(-1)  # (B, T, 1)
        per_window = torch.stack(
            [
                m.expand_as(x).sum(1),  # (B, P)
                (m * x).sum(1),
                (m * y).sum(1),
                (m * x * x).sum(1),
                (m * y * y).sum(1),
                (m * x * y).sum(1),
            ]
        )  # (6, B, P)
        self.sums.index_add_(1, subject_id.to(self.sums.device), per_window.to(self.sums.device))

    def compute(self) -> torch.Tensor:
        """(n_subjects, n_parcels) float64 Pearson r; 0 where a variance is 0 or no rows were seen."""
        n, sx, sy, sxx, syy, sxy = self.sums
        cov = sxy - sx * sy / n.clamp_min(1)
        vx = sxx - sx * sx / n.clamp_min(1)
        vy = syy - sy * sy / n.clamp_min(1)
        den = (vx * vy).clamp_min(0).sqrt()
        return torch.where(den > 0, cov / den.clamp_min(1e-300), torch.zeros_like(den))


def pooled_rows(real: torch.Tensor, n_rows: int) -> torch.Tensor:
    """``(B, n_rows)`` bool: every row of the windows that belong to the split (``real`` ``(B,)`` bool),
    padded rows included; none of the windows that only even out ranks."""
    return real.to(torch.bool)[:, None].expand(-1, n_rows)


@torch.no_grad()
def eval_batch(
    model: nn.Module,
    batch: Batch,
    acc: PearsonAccumulator,
    precision: str = "fp32",
    pooled: PearsonAccumulator | None = None,
    real: torch.Tensor | None = None,
) -> torch.Tensor:
    """Predict one batch in eval mode, add it to ``acc``; returns the masked sum of squared errors.

    ``pooled`` (one group) also receives every row of the windows flagged by ``real`` ``(B,)`` bool
    (all windows when None), padded rows included, for the pooled r.
    """
    model.eval()
    with autocast_context(batch.fmri.device, precision):
        pred = model(batch.features, batch.subject_id)  # (B, T, P)
    pred = pred.to(torch.promote_types(pred.dtype, torch.float32))  # half precision -> float32
    acc.update(pred, batch.fmri, batch.mask, batch.subject_id)
    if pooled is not None:
        B, T = batch.mask.shape
        real = torch.ones(B, dtype=torch.bool, device=batch.mask.device) if real is None else real
        group = torch.zeros(B, dtype=torch.long, device=batch.subject_id.device)
        pooled.update(pred, batch.fmri, pooled_rows(real.to(batch.mask.device), T), group)
    return masked_sse(pred, batch.fmri, batch.mask)
