"""fMRI runs from the release h5 files: load, validate, z-score, reconcile lengths."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from mirage.errors import DataError


def _open(path: Path) -> h5py.File:
    if not path.is_file():
        raise DataError(f"{path}: fMRI file not found")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"{path}: not a readable HDF5 file ({e})") from None


def run_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """h5 key -> dataset shape, without reading the data."""
    path = Path(path)
    with _open(path) as f:
        return {k: tuple(f[k].shape) for k in f.keys() if isinstance(f[k], h5py.Dataset)}


def load_fmri(path: str | Path, key: str, n_parcels: int | None = None) -> np.ndarray:
    """One run as float32 (n_trs, n_parcels), whatever float dtype is stored.

    Raises DataError naming file and key when the file or key is missing or unreadable, the
    dataset is not 2-D floating point, its parcel count differs from ``n_parcels`` (when
    given), or it holds NaN/inf.
    """
    path = Path(path)
    with _open(path) as f:
        if key not in f:
            keys = sorted(f.keys())
            raise DataError(f"{path}: key {key!r} not found (file has {len(keys)} keys, e.g. {keys[:3]})")
        ds = f[key]
        if not isinstance(ds, h5py.Dataset):
            raise DataError(f"{path}: key {key!r} is a group, expected a 2-D dataset (n_trs, n_parcels)")
        if ds.ndim != 2:
            raise DataError(f"{path}: key {key!r} has shape {ds.shape}, expected 2-D (n_trs, n_parcels)")
        if ds.dtype.kind != "f":
            raise DataError(f"{path}: key {key!r} has dtype {ds.dtype}, expected floating point")
        if n_parcels is not None and ds.shape[1] != n_parcels:
            raise DataError(f"{path}: key {key!r} has {ds.shape[1]} parcels (shape {ds.shape}), expected {n_parcels}")
        try:
            data = ds[()]
        except (OSError, RuntimeError) as e:
            raise DataError(f"{path}: key {key!r} cannot be read, the file is truncated or corrupt ({e})") from None
    bad = ~np.isfinite(data)
    if bad.any():
        rows, cols = np.nonzero(bad)
        raise DataError(
            f"{path}: key {key!r} has {int(bad.sum())} non-finite values (first at TR {rows[0]}, parcel {cols[0]}); "
            "expected finite numbers"
        )
    return data.astype(np.float32, copy=False)


def zscore(x: np.ndarray, eps: float = 1e-8, ddof: int = 1) -> np.ndarray:
    """z-score each parcel over time: x (n_trs, n_parcels) -> float32 (n_trs, n_parcels).

    Computed in float64. By default divides by the sample standard deviation (``ddof=1``, as
    the reference and nilearn's ``zscore_sample``), as the training targets are; ``ddof=0``
    divides by the population one (scipy's default), as the scoring targets are. Parcels whose
    standard deviation is ``<= eps`` (or with no more than ``ddof`` TRs) become 0.
    """
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=0, keepdims=True)  # (1, P)
    std = x.std(axis=0, ddof=ddof, keepdims=True) if len(x) > ddof else np.zeros_like(mean)  # (1, P)
    out = np.where(std > eps, (x - mean) / np.where(std > eps, std, 1.0), 0.0)
    return out.astype(np.float32)


@dataclass(frozen=True)
class Reconciled:
    """fMRI vs stimulus length: rows kept, TRs the stimulus spans, and their difference."""

    n_trs: int
    n_stimulus_trs: int
    diff_trs: int


def stimulus_trs(duration_s: float, tr: float) -> int:
    """TRs that start before the stimulus ends: ceil(duration / tr)."""
    return int(math.ceil(duration_s / tr - 1e-6))


def reconcile_lengths(n_fmri_trs: int, duration_s: float, tr: float, max_mismatch_trs: int, where: str = "") -> Reconciled:
    """Explicit rule for runs whose length differs from their stimulus.

    The fMRI run is the reference: all its rows are kept. Rows past the stimulus end see
    zero-padded features (the response still carries the stimulus through the HRF delay);
    stimulus past the last fMRI row is unused. A difference larger than
    ``max_mismatch_trs`` is an error (wrong stimulus or truncated run).
    """
    n_stim = stimulus_trs(duration_s, tr)
    diff = n_fmri_trs - n_stim
    if abs(diff) > max_mismatch_trs:
        raise DataError(
            f"{where}: fMRI has {n_fmri_trs} TRs but the stimulus lasts {duration_s:.2f} s = {n_stim} TRs "
            f"(difference {diff:+d}); expected at most {max_mismatch_trs} TRs apart (data.max_length_mismatch_trs)"
        )
    return Reconciled(n_trs=n_fmri_trs, n_stimulus_trs=n_stim, diff_trs=diff)
