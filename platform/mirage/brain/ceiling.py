"""Per-parcel noise ceiling (the largest r a prediction of one run can reach) and ceiling-normalised r.

Where a ceiling comes from (``load_ceiling``, first found wins):

1. a user file (``data.noise_ceiling``): ``.npy`` holding a float array of shape (n_parcels,), or
   ``.tsv`` / ``.txt`` with n_parcels values, one per line in parcel order (parcel i = atlas label
   i + 1), an optional non-numeric header line first; ``nan`` / ``n/a`` for a parcel without one.
   Values are correlations in [0, 1]. A named file that is missing or malformed is an error.
2. the synthetic truth (``<root>/_truth/truth.npz``, ``noise_ceiling``): sqrt(snr / (1 + snr)) of
   the planted signal, 0 for noise-only parcels.
3. repeated presentations in the release (Movie10 ``life``/``figures`` are recorded twice,
   ``_run-1``/``_run-2``): per subject, the per-parcel correlation between the two runs of every
   repeated stimulus (trimmed to the shorter run), averaged over stimuli, is the reliability of
   one run; the ceiling is its square root (the rule of ``mirage.metrics.noise_ceiling_split_half``,
   applied to the averaged reliability); without a subject, the reliabilities are averaged over
   subjects first.

Normalising is ``mirage.metrics.noise_ceiling_normalized``: r / ceiling where the ceiling is finite
and at least ``min_ceiling`` (``data.noise_ceiling_min``), NaN elsewhere; not clipped at 1.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mirage.errors import DataError
from mirage.metrics import pearson_r


@dataclass(frozen=True)
class Ceiling:
    """A per-parcel noise ceiling: ``values`` (P,) float64 in [0, 1] (NaN = none) and where it came from."""

    values: np.ndarray
    source: str


def load_ceiling(data_root: str | os.PathLike | None, n_parcels: int, path: str | os.PathLike = "",
                 subject: str | None = None) -> Ceiling | None:
    """The noise ceiling of ``n_parcels`` parcels (see the module docstring for the order), or None.

    Raises DataError if ``path`` is given and is not a valid ceiling file, or if the synthetic truth
    has another parcel count.
    """
    if path:
        return Ceiling(read_ceiling_file(path, n_parcels), f"file {Path(path)}")
    if data_root is None:
        return None
    root = Path(data_root)
    truth = root / "_truth" / "truth.npz"
    if truth.is_file():
        with np.load(truth) as z:
            if "noise_ceiling" in z.files:
                values = np.asarray(z["noise_ceiling"], dtype=np.float64)
                if values.shape != (n_parcels,):
                    raise DataError(f"{truth}: noise_ceiling has shape {values.shape}, expected ({n_parcels},)")
                return Ceiling(values, "synthetic truth")
    reliab = _repeat_reliability(root, n_parcels, [subject] if subject else None)
    if reliab is None:
        return None
    values, stimuli = reliab
    who = subject or "mean over subjects"
    return Ceiling(np.sqrt(np.clip(values, 0.0, 1.0)), f"repeats ({', '.join(stimuli)}; {who})")


def repeat_ceiling(data_root: str | os.PathLike, subject: str, n_parcels: int) -> np.ndarray | None:
    """Split-half noise ceiling of one subject from repeated stimuli: (P,) in [0, 1], or None without repeats."""
    reliab = _repeat_reliability(Path(data_root), n_parcels, [subject])
    return None if reliab is None else np.sqrt(np.clip(reliab[0], 0.0, 1.0))


def _repeat_reliability(root: Path, n_parcels: int, subjects: list[str] | None) -> tuple[np.ndarray, list[str]] | None:
    """Mean repeat correlation (P,) over the subjects' repeated stimuli, and those stimuli; None if none."""
    from mirage.data.fmri import load_fmri
    from mirage.data.layout import Release, parse_fmri_key

    if not (root / "fmri").is_dir():
        return None
    release = Release(root)
    per_subject: list[np.ndarray] = []
    names: set[str] = set()
    for sub in subjects if subjects is not None else release.subjects():
        groups: dict[tuple[Path, str], list[str]] = defaultdict(list)
        for run in release.fmri_runs(sub):
            _, rep = parse_fmri_key(run.key)
            if rep is not None:
                groups[(run.path, run.stimulus_id)].append(run.key)
        rs = []
        for (path, stim), keys in sorted(groups.items()):
            if len(keys) < 2:
                continue
            a, b = (load_fmri(path, k, n_parcels) for k in sorted(keys)[:2])
            n = min(len(a), len(b))
            rs.append(pearson_r(a[:n], b[:n]))
            names.add(stim)
        if rs:
            per_subject.append(np.mean(rs, axis=0))
    if not per_subject:
        return None
    return np.mean(per_subject, axis=0), sorted(names)


def read_ceiling_file(path: str | os.PathLike, n_parcels: int) -> np.ndarray:
    """A user ceiling file (.npy or .tsv/.txt, format in the module docstring): (P,) float64.

    Raises DataError naming the file: missing, unreadable, wrong count, or values outside [0, 1].
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: noise ceiling file not found; expected .npy or .tsv with {n_parcels} values")
    if path.suffix == ".npy":
        try:
            values = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise DataError(f"{path}: not a readable .npy float array ({e})") from None
        if values.dtype.kind not in "fiu":
            raise DataError(f"{path}: dtype {values.dtype}, expected numbers (noise ceiling per parcel)")
        values = values.astype(np.float64)
    elif path.suffix in (".tsv", ".txt"):
        values = _read_lines(path)
    else:
        raise DataError(f"{path}: unknown noise ceiling format {path.suffix!r}; expected .npy or .tsv")
    if values.shape != (n_parcels,):
        raise DataError(f"{path}: noise ceiling has shape {values.shape}, expected ({n_parcels},) (one value per parcel)")
    finite = values[np.isfinite(values)]
    if finite.size and (finite.min() < 0 or finite.max() > 1):
        raise DataError(f"{path}: noise ceiling values span [{finite.min():.3g}, {finite.max():.3g}]; "
                        "expected correlations in [0, 1]")
    return values


def _read_lines(path: Path) -> np.ndarray:
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    out: list[float] = []
    for k, line in enumerate(lines):
        token = line.split("\t")[0].strip()
        if token.lower() in ("nan", "n/a", "na"):
            out.append(np.nan)
            continue
        try:
            out.append(float(token))
        except ValueError:
            if k == 0:
                continue  # header
            raise DataError(f"{path}: line {k + 1} is {line!r}; expected one number per line") from None
    return np.asarray(out, dtype=np.float64)

