"""Cutting runs into training and prediction windows (pure; every number from the config).

Feature frame ``i`` of a stimulus holds the extraction cutoff at ``(i + 1) / rate_hz``
seconds. A window of ``window_trs`` fMRI rows starting at TR ``tr_start`` reads
``round(window_trs * tr * rate_hz)`` feature frames (298 for the paper) starting
``hrf_delay_trs`` TRs earlier, i.e. at frame ``round((tr_start - hrf_delay_trs) * tr * rate_hz)``.
Frame indices may fall below 0 or past the last frame: those rows are zero
padding. fMRI rows past the end of the run are padding too; ``mask`` marks the real ones.
:func:`run_windows` first reconciles the run's length with its stimulus' by the rule of
``data check`` (:func:`mirage.data.fmri.reconcile_lengths`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mirage.config import DataConfig
from mirage.data.fmri import reconcile_lengths


@dataclass(frozen=True)
class Window:
    """One window: fMRI rows [tr_start, tr_stop) and feature rows [frame_start, frame_stop)."""

    tr_start: int
    tr_stop: int
    frame_start: int
    frame_stop: int
    n_valid: int

    @property
    def mask(self) -> np.ndarray:
        """bool (window_trs,): True for rows that exist in the run."""
        return np.arange(self.tr_stop - self.tr_start) < self.n_valid


def n_feature_frames(duration_s: float, rate_hz: float) -> int:
    """Feature frames of a stimulus: cutoffs (i + 1) / rate_hz up to the first at or past the end."""
    return max(int(math.ceil(duration_s * rate_hz - 1e-6)), 0)


def window_frames(cfg: DataConfig, rate_hz: float) -> int:
    """Feature frames per window: round(window_trs * tr * rate_hz)."""
    return int(round(cfg.window_trs * cfg.tr * rate_hz))


def make_windows(n_trs: int, cfg: DataConfig, rate_hz: float, n_frames: int, stride_trs: int | None = None) -> list[Window]:
    """Windows of ``cfg.window_trs`` TRs every ``stride_trs`` (default ``cfg.stride_trs``) TRs.

    Windows start at TR 0 and continue while they start inside the run; the last one may
    run past ``n_trs`` (padding, see ``mask``). ``n_frames`` is the stimulus' feature frame
    count (frames past it are padding; kept for callers that clip).
    """
    stride = cfg.stride_trs if stride_trs is None else stride_trs
    if stride < 1:
        raise ValueError(f"stride_trs must be >= 1, got {stride}")
    length = window_frames(cfg, rate_hz)
    out = []
    for start in range(0, max(n_trs, 0), stride):
        f0 = int(round((start - cfg.hrf_delay_trs) * cfg.tr * rate_hz))
        out.append(Window(
            tr_start=start, tr_stop=start + cfg.window_trs, frame_start=f0, frame_stop=f0 + length,
            n_valid=min(cfg.window_trs, n_trs - start),
        ))
    return out


def run_windows(
    n_fmri_trs: int, duration_s: float, cfg: DataConfig, rate_hz: float, n_frames: int, where: str = "",
    stride_trs: int | None = None,
) -> list[Window]:
    """:func:`make_windows` of one fMRI run after reconciling its length with its stimulus'.

    The rule of ``data check`` (:func:`~mirage.data.fmri.reconcile_lengths`): every fMRI row is kept
    (rows past the stimulus read zero features), and a run more than ``cfg.max_length_mismatch_trs``
    TRs longer or shorter than ``ceil(duration_s / cfg.tr)`` raises DataError naming ``where``.
    """
    r = reconcile_lengths(n_fmri_trs, duration_s, cfg.tr, cfg.max_length_mismatch_trs, where=where)
    return make_windows(r.n_trs, cfg, rate_hz, n_frames, stride_trs)


def windows_for_prediction(n_trs: int, cfg: DataConfig, rate_hz: float, n_frames: int) -> list[Window]:
    """Non-overlapping windows (stride = window) that cover every TR of a run exactly once."""
    return make_windows(n_trs, cfg, rate_hz, n_frames, stride_trs=cfg.window_trs)


def slice_padded(x: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of x along axis 0, zero where the range leaves [0, len(x)).

    x: (n_rows, ...) -> (stop - start, ...), same dtype.
    """
    out = np.zeros((stop - start, *x.shape[1:]), dtype=x.dtype)
    lo, hi = max(start, 0), min(stop, len(x))
    if hi > lo:
        out[lo - start: hi - start] = x[lo:hi]
    return out
