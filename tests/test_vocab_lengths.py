"""Training windows reconcile fMRI and stimulus lengths by the rule of ``data check``.

A run of the synthetic test dataset (a 40 s movie, 27 TRs) rewritten with fewer or more fMRI rows
than ``data.max_length_mismatch_trs`` allows: building its training windows raises the very error
that ``data check`` reports; a difference within the tolerance keeps every fMRI row, as there.
"""

from __future__ import annotations


import h5py
import numpy as np
import pytest

from mirage.data.check import check_dataset
from mirage.data.windows import run_windows
from mirage.errors import DataError
from mirage.train.data import WindowDataset

KEY = "ses-001_task-s01e01a"
"""A training run of sub-01 (Friends s01e01a)."""


def _set_rows(root, n_trs: int):
    """Give ``KEY`` of sub-01 ``n_trs`` fMRI rows (random, so that a z-score is defined); its h5 path."""
    path = next((root / "fmri" / "sub-01" / "func").glob("*task-friends*_bold.h5"))
    with h5py.File(path, "a") as f:
        n_parcels = f[KEY].shape[1]
        del f[KEY]
        f[KEY] = np.random.default_rng(0).standard_normal((n_trs, n_parcels)).astype(np.float32)
    return path


@pytest.mark.parametrize("n_trs", [10, 40])  # 17 TRs short of the 27-TR movie, 13 TRs past it
def test_training_windows_raise_the_error_of_data_check(synth_copy, train_cfg, feature_store, n_trs):
    path = _set_rows(synth_copy, n_trs)
    cfg = train_cfg.with_overrides({"data.root": str(synth_copy)})
    report = check_dataset(synth_copy, cfg.data)
    reported = [e for e in report["errors"] if f"key {KEY!r}" in e]
    assert len(reported) == 1 and f"fMRI has {n_trs} TRs" in reported[0], report["errors"]
    with pytest.raises(DataError) as err:
        WindowDataset(cfg, "train", feature_store)
    assert str(err.value) == reported[0]
    assert str(path) in str(err.value) and "data.max_length_mismatch_trs" in str(err.value)


def test_a_difference_within_the_tolerance_keeps_every_fmri_row(synth_copy, train_cfg, feature_store):
    n_trs = 29  # the movie spans 27 TRs; data.max_length_mismatch_trs is 5
    _set_rows(synth_copy, n_trs)
    cfg = train_cfg.with_overrides({"data.root": str(synth_copy)})
    report = check_dataset(synth_copy, cfg.data)
    assert report["ok"], report["errors"]
    assert report["lengths"]["diff_histogram"].get("2", 0) >= 1
    train = WindowDataset(cfg, "train", feature_store)
    refs = [r for r in train.refs if r.fmri_key == KEY and r.subject_index == 0]
    assert sum(r.n_valid for r in refs) == n_trs  # every fMRI row in exactly one window
    assert {r.n_trs for r in refs} == {n_trs}


def test_run_windows_applies_the_tolerance_of_the_config(train_cfg):
    data = train_cfg.data.model_copy(update={"max_length_mismatch_trs": 1})
    rate = 2.0
    windows = run_windows(28, 40.0, data, rate, 80, where="f.h5: key 'k'")  # 40 s = 27 TRs, one more row
    assert sum(w.n_valid for w in windows) == 28
    with pytest.raises(DataError, match=r"f\.h5: key 'k': fMRI has 29 TRs .*27 TRs .*\+2"):
        run_windows(29, 40.0, data, rate, 80, where="f.h5: key 'k'")
