"""Algonauts 2025 submission files (Codabench) and scoring with the official rule.

A submission is a zip holding exactly one ``.npy`` file (written as ``fmri_predictions_friends_s7.npy``
or ``fmri_predictions_ood.npy``; any single ``.npy`` name is read): a pickled dict ``{subject: {chunk_key: float32 (n_trs,
n_parcels)}}`` with ``n_trs`` equal to the target sample numbers and no NaN. The grader
reads it with ``np.load(path, allow_pickle=True).item()`` under numpy < 2, so the pickle
written here references only ``numpy.array``, ``numpy.ndarray`` and ``builtins.bytearray``
(numpy 2 pickles arrays through ``numpy._core``, which numpy 1 does not have).

Pure numpy: no Ray, no MLflow.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mirage.data.fmri import load_fmri, zscore
from mirage.data.layout import TARGET_SETS, Release, read_pickled_dict
from mirage.data.run_key import RunKey, run_keys
from mirage.errors import DataError
from mirage.metrics import EDGE_TRS, algonauts_score

NPY_NAMES = {"friends-s7": "fmri_predictions_friends_s7.npy", "ood": "fmri_predictions_ood.npy"}
ZIP_NAMES = {"friends-s7": "fmri_predictions_friends_s7.zip", "ood": "fmri_predictions_ood.zip"}
PICKLE_PROTOCOL = 4

Predictions = dict[str, dict[str, np.ndarray]]


def _split(split: str) -> str:
    if split not in TARGET_SETS:
        raise DataError(f"submission split {split!r}: expected one of {list(TARGET_SETS)}")
    return split


# ----------------------------------------------------------------- validation


def check_predictions(
    preds: Mapping[str, Mapping[str, np.ndarray]],
    targets: Mapping[str, Mapping[str, int]],
    n_parcels: int | None = None,
) -> Predictions:
    """Check predictions against the target sample numbers; return float32 C-contiguous copies.

    Args:
        preds: subject -> chunk key -> (n_trs, n_parcels).
        targets: subject -> chunk key -> n_trs (``Release.target_samples``).
        n_parcels: expected parcel count (None: whatever the first array has, equal for all).

    Raises:
        DataError: a subject or chunk missing or extra, a wrong shape, a non-finite value.
    """
    missing_subjects = sorted(set(targets) - set(preds))
    extra_subjects = sorted(set(preds) - set(targets))
    if missing_subjects or extra_subjects:
        raise DataError(
            f"submission: subjects {sorted(preds)} do not match the targets {sorted(targets)} "
            f"(missing {missing_subjects}, unexpected {extra_subjects})"
        )
    out: Predictions = {}
    for sub in sorted(targets):
        want, have = targets[sub], preds[sub]
        missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        if missing or extra:
            raise DataError(f"submission {sub}: chunks missing {missing}, unexpected {extra}")
        out[sub] = {}
        for key in sorted(want):
            arr = np.asarray(have[key])
            if arr.ndim != 2 or arr.shape[0] != int(want[key]):
                raise DataError(
                    f"submission {sub}/{key}: shape {arr.shape}, expected ({int(want[key])}, n_parcels) "
                    f"(n_trs from the target sample numbers)"
                )
            if n_parcels is None:
                n_parcels = arr.shape[1]
            if arr.shape[1] != n_parcels:
                raise DataError(f"submission {sub}/{key}: {arr.shape[1]} parcels, expected {n_parcels}")
            if not np.issubdtype(arr.dtype, np.floating) or not np.isfinite(arr).all():
                raise DataError(f"submission {sub}/{key}: expected finite floats, got {arr.dtype} with NaN/inf")
            out[sub][key] = np.ascontiguousarray(arr, dtype=np.float32)
    return out


# -------------------------------------------------------------------- writing


class _PortablePickler(pickle.Pickler):
    """Pickles arrays through ``numpy.ndarray(shape, dtype, bytearray)``: loadable by numpy 1 and 2."""

    def reducer_override(self, obj):
        if isinstance(obj, np.ndarray):
            if obj.dtype == object:
                if obj.ndim != 0:
                    raise TypeError("only 0-d object arrays (the wrapped dict) are written")
                return np.array, (obj.item(), "O")
            if obj.dtype.kind not in "fiub":
                raise TypeError(f"array dtype {obj.dtype} is not written")
            arr = np.ascontiguousarray(obj)
            return np.ndarray, (arr.shape, arr.dtype.str, bytearray(arr.tobytes()))
        return NotImplemented


def npy_bytes(preds: Predictions) -> bytes:
    """The ``.npy`` file of a prediction dict: a 0-d object array holding the dict, pickled portably."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|O", "fortran_order": False, "shape": ()})
    _PortablePickler(buf, protocol=PICKLE_PROTOCOL).dump(np.array(preds, dtype=object))
    return buf.getvalue()


def write_submission(
    preds: Mapping[str, Mapping[str, np.ndarray]],
    split: str,
    out_dir: str | os.PathLike,
    targets: Mapping[str, Mapping[str, int]],
    n_parcels: int | None = None,
) -> Path:
    """Check ``preds`` and write ``<out_dir>/fmri_predictions_<split>.zip`` atomically.

    Args:
        preds: subject -> chunk key -> (n_trs, n_parcels).
        split: ``"friends-s7"`` or ``"ood"``.
        out_dir: folder for the zip (created).
        targets: subject -> chunk key -> n_trs.

    Returns:
        Path of the zip, which holds exactly one ``.npy``.
    """
    split = _split(split)
    clean = check_predictions(preds, targets, n_parcels)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / ZIP_NAMES[split]
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(NPY_NAMES[split], npy_bytes(clean))
    os.replace(tmp, path)
    return path


# -------------------------------------------------------------------- reading


def read_submission(path: str | os.PathLike, max_bytes: int = 4 << 30) -> tuple[str, Predictions]:
    """Read a submission zip the way the grader does: ``(split, {subject: {chunk: array}})``.

    The zip must hold exactly one file, a ``.npy`` of any name, of at most ``max_bytes``
    uncompressed (a full S7 or OOD submission is a few hundred MB). The pickle inside is read
    with an allow-list (dicts, numpy arrays and scalars only): a crafted file cannot run code.
    The split comes from the official names when used, else from the chunk keys (``s07e..``
    keys: ``friends-s7``, anything else: ``ood``).

    Raises:
        DataError: not a zip, not exactly one ``.npy``, too large, a refused pickle, not a dict
            of dicts of arrays.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            infos = [i for i in zf.infolist() if not i.is_dir()]
            names = [i.filename for i in infos]
            if len(infos) != 1 or not names[0].endswith(".npy"):
                raise DataError(f"{path}: expected exactly one file, a .npy (any name), found {names}")
            if infos[0].file_size > max_bytes:
                raise DataError(
                    f"{path}: {names[0]} holds {infos[0].file_size} bytes uncompressed, expected at most {max_bytes}"
                )
            raw = zf.read(infos[0])
    except zipfile.BadZipFile as e:
        raise DataError(f"{path}: not a zip file ({e})") from None
    data = read_pickled_dict(io.BytesIO(raw), f"{path}: {names[0]}")
    if not all(isinstance(v, dict) for v in data.values()):
        raise DataError(f"{path}: expected a dict subject -> dict chunk -> array, got {type(data).__name__}")
    split = {v: k for k, v in NPY_NAMES.items()}.get(Path(names[0]).name)
    if split is None:
        keys = {k for chunks in data.values() for k in chunks}
        split = "friends-s7" if keys and all(str(k).startswith("s07") for k in keys) else "ood"
    return split, data


# -------------------------------------------------------------------- scoring


def score_predictions(
    preds: Mapping[str, Mapping[str, np.ndarray]],
    targets: Mapping[str, Mapping[str, np.ndarray]],
    split: str,
) -> dict[str, float]:
    """Score with the official rule: ``{"score": mean r, "<subject>": r, "<subject>/<group>": r}``.

    :func:`mirage.metrics.algonauts_score`: per subject and group (an OOD movie, a Friends
    season) the chunks are concatenated over time after dropping the first and last 5 TRs of
    each chunk, Pearson r per parcel, mean over parcels, then over groups and subjects. The
    official test code applies this edge rule to Friends S7 and to the OOD movies alike; the
    validation season is scored in the same form.

    Args:
        preds, targets: subject -> chunk key -> (n_trs, n_parcels), same keys and shapes.
        split: ``"ood"``, ``"friends-s7"`` or ``"val"``.
    """
    if split not in (*TARGET_SETS, "val"):
        raise DataError(f"scoring split {split!r}: expected one of {[*TARGET_SETS, 'val']}")
    return algonauts_score(preds, targets, edge_trs=EDGE_TRS).flat()


# -------------------------------------------------------- predictions on disk


def write_predictions(preds: Mapping[str, Mapping[str, np.ndarray]], path: str | os.PathLike) -> Path:
    """Predictions of a split with fMRI (e.g. val) as ``.npz``: one float32 array per ``subject/chunk``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    arrays = {f"{sub}/{key}": np.asarray(a, np.float32) for sub, runs in preds.items() for key, a in runs.items()}
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return path


def read_predictions(path: str | os.PathLike) -> Predictions:
    """Read :func:`write_predictions` output (no pickles)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            out: Predictions = {}
            for name in z.files:
                sub, _, key = name.partition("/")
                if not key:
                    raise DataError(f"{path}: entry {name!r} is not named <subject>/<chunk>")
                out.setdefault(sub, {})[key] = z[name]
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: not a predictions .npz ({e})") from None
    return out


def fmri_targets(root: str | os.PathLike, data_cfg, keys: Mapping[str, Any]) -> Predictions:
    """Measured fMRI for every ``subject -> run name`` in ``keys`` (z-scored per run when ``data.zscore``).

    Run names as :class:`mirage.data.run_key.RunKey` writes them (``s06e01a``, ``life01#2``; the h5
    task form ``life01_run-2`` is read too); the result is keyed by the names given.

    Raises:
        DataError: a run has no fMRI in the release (the test splits have none).
    """
    release = Release(root)
    out: Predictions = {}
    for sub, names in keys.items():
        runs = dict(run_keys(release.fmri_runs(sub)))
        out[sub] = {}
        for name in names:
            run = runs.get(RunKey.parse(sub, name))
            if run is None:
                raise DataError(f"{root}: no fMRI run for {sub}/{name} (the test splits release no fMRI)")
            y = load_fmri(run.path, run.key)  # float32 (T, P)
            # population std (ddof 0) and no threshold: Pearson r does not depend on the scale
            out[sub][name] = zscore(y, eps=0.0, ddof=0) if data_cfg.zscore else y.astype(np.float32)
    return out
