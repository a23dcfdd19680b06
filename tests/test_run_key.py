"""One run key (subject, stimulus, repeat): names, parsing, repeats, and the file layout {subject: {name: x}}."""

from __future__ import annotations

import numpy as np
import pytest
from mirage.data.fmri import load_fmri
from mirage.data.layout import FmriRun, Release
from mirage.data.run_key import RunKey, flatten, nest, run_keys
from mirage.ensemble import episode_of, two_folds
from mirage.errors import DataError
from mirage.submission import fmri_targets


@pytest.mark.parametrize("key, name", [
    (RunKey("sub-01", "s06e01a"), "s06e01a"),
    (RunKey("sub-01", "s06e01a", 2), "s06e01a#2"),
    (RunKey("sub-05", "life01", 3), "life01#3"),
    (RunKey("sub-02", "chaplin1"), "chaplin1"),
])
def test_names_round_trip(key, name):
    assert key.name == name
    assert RunKey.parse(key.subject, name) == key


def test_h5_task_form_reads_as_a_repeat_and_bad_names_are_refused():
    assert RunKey.parse("sub-01", "life01_run-2") == RunKey("sub-01", "life01", 2)
    for bad in ("", "s06e01a#0", "s06e01a#x", "a/b", "s06e01a#2#3"):
        with pytest.raises(DataError, match="run name"):
            RunKey.parse("sub-01", bad)
    with pytest.raises(DataError, match="repeat"):
        RunKey("sub-01", "s06e01a", 0)


def test_repeats_count_viewings_per_subject_in_order():
    runs = [FmriRun(s, f"ses-{i:03d}_task-{st}", st, None) for i, (s, st) in enumerate(
        [("sub-01", "life01"), ("sub-02", "life01"), ("sub-01", "s06e01a"), ("sub-01", "life01"), ("sub-01", "life01")])]
    keys = [k for k, _ in run_keys(runs)]
    assert [k.name for k in keys] == ["life01", "life01", "s06e01a", "life01#2", "life01#3"]
    assert [k.subject for k in keys] == ["sub-01", "sub-02", "sub-01", "sub-01", "sub-01"]


def test_nest_and_flatten_are_inverse():
    flat = {RunKey("sub-01", "s06e01a"): 1, RunKey("sub-01", "s06e01a", 2): 2, RunKey("sub-02", "s06e02b"): 3}
    nested = nest(flat)
    assert nested == {"sub-01": {"s06e01a": 1, "s06e01a#2": 2}, "sub-02": {"s06e02b": 3}}
    assert flatten(nested) == flat


def test_episodes_and_folds_read_run_names():
    assert RunKey("sub-01", "s06e01b", 2).episode == "s06e01" == episode_of("s06e01b#2")
    assert episode_of("life01#2") == "life01" == episode_of("life01_run-2")
    a, b = two_folds(["s06e01a", "s06e01b#2", "s06e02a"])
    assert a == ["s06e01a", "s06e01b#2"] and b == ["s06e02a"]


def test_fmri_targets_read_runs_by_name(serve_cfg):
    """The scoring side names a release run as the prediction side does."""
    release = Release(serve_cfg.data.root)
    sub = serve_cfg.data.subjects[0]
    key, run = run_keys(release.fmri_runs(sub))[0]
    got = fmri_targets(serve_cfg.data.root, serve_cfg.data.model_copy(update={"zscore": False}), {sub: [key.name]})
    np.testing.assert_array_equal(got[sub][key.name], load_fmri(run.path, run.key))
    with pytest.raises(DataError, match="no fMRI run"):
        fmri_targets(serve_cfg.data.root, serve_cfg.data, {sub: [f"{key.stimulus}#9"]})
