"""Ensemble math against independent references (float64, tiny arrays)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import softmax
from scipy.stats import pearsonr

from mirage.ensemble import (
    choose_members,
    combine,
    fit_ensemble,
    softmax_weights,
    split_fit_score,
    write_ensemble_dir,
)
from mirage.errors import MirageError


def test_softmax_weights_match_scipy_per_subject_and_parcel():
    rng = np.random.default_rng(0)
    val_r = rng.uniform(-0.2, 0.6, size=(5, 4, 7))
    w = softmax_weights(val_r, 0.3)
    for s in range(4):
        for p in range(7):
            np.testing.assert_allclose(w[:, s, p], softmax(val_r[:, s, p] / 0.3), rtol=1e-12)
    np.testing.assert_allclose(w.sum(0), 1.0)


def test_low_temperature_picks_best_member_and_nan_counts_as_zero():
    val_r = np.array([[0.1, np.nan], [0.5, -0.2]])  # (M=2, P=2)
    w = softmax_weights(val_r, 1e-3)
    np.testing.assert_allclose(w[:, 0], [0, 1], atol=1e-12)
    np.testing.assert_allclose(w[:, 1], [1, 0], atol=1e-12)  # nan -> 0 beats -0.2


def test_combine_is_weighted_sum():
    rng = np.random.default_rng(1)
    preds = rng.normal(size=(3, 6, 4))
    w = softmax_weights(rng.uniform(size=(3, 4)), 0.5)
    ref = sum(w[m][None, :] * preds[m] for m in range(3))
    np.testing.assert_allclose(combine(preds, w), ref, rtol=1e-5)


def test_split_is_disjoint_deterministic_and_needs_two_runs():
    fit, score = split_fit_score(["s06e02a", "s06e01a", "s06e01b", "s06e02b"], 0.5)
    assert fit == ["s06e01a", "s06e01b"] and score == ["s06e02a", "s06e02b"]
    fit, score = split_fit_score(["a", "b"], 0.9)
    assert fit == ["a"] and score == ["b"]
    with pytest.raises(MirageError, match="at least 2 validation runs"):
        split_fit_score(["a"], 0.5)


def test_fit_ensemble_matches_loop_reference_and_scores_on_held_out_runs():
    rng = np.random.default_rng(2)
    subjects, runs, M, T, P = ["sub-01", "sub-02"], ["r1", "r2", "r3", "r4"], 3, 30, 5
    targets = {s: {k: rng.normal(size=(T, P)) for k in runs} for s in subjects}
    preds = {s: {k: targets[s][k][None] + rng.normal(size=(M, T, P)) * (1 + np.arange(M))[:, None, None] for k in runs} for s in subjects}
    fit = fit_ensemble(preds, targets, subjects, fit_fraction=0.5, temperature=0.3)
    assert fit.fit_stimuli == ["r1", "r2"] and fit.score_stimuli == ["r3", "r4"]
    assert fit.weights.shape == (M, 2, P)
    for si, s in enumerate(subjects):
        tf = np.concatenate([targets[s][k] for k in ("r1", "r2")])
        ts = np.concatenate([targets[s][k] for k in ("r3", "r4")])
        for p in range(P):
            r_fit = [pearsonr(np.concatenate([preds[s][k][m] for k in ("r1", "r2")])[:, p], tf[:, p])[0] for m in range(M)]
            w_ref = softmax(np.array(r_fit) / 0.3)
            np.testing.assert_allclose(fit.weights[:, si, p], w_ref, rtol=1e-5)
            ens = sum(w_ref[m] * np.concatenate([preds[s][k][m] for k in ("r3", "r4")])[:, p] for m in range(M))
            np.testing.assert_allclose(fit.ensemble_r[si, p], pearsonr(ens, ts[:, p])[0], atol=1e-5)
    assert fit.best_member == 0  # least noise
    summary = fit.summary()
    assert set(summary) >= {"ensemble_r", "best_member_r", "ensemble_r/sub-01", "best_member_r/sub-02"}


def test_choose_members_cycles_configs_then_seeds():
    ranked = [{"model.depth": 3}, {"model.depth": 1}, {"model.depth": 2}]
    ms = choose_members(ranked, top_k=2, n_members=5, base_seed=33, sources=["t1", "t2", "t3"])
    assert [(m.overrides["model.depth"], m.seed, m.source) for m in ms] == [
        (3, 33, "t1"), (1, 33, "t2"), (3, 34, "t1"), (1, 34, "t2"), (3, 35, "t1")
    ]
    with pytest.raises(MirageError, match="no finished trial"):
        choose_members([], 2, 3, 0)


def test_write_ensemble_dir_layout(tmp_path):
    members = []
    for i in range(2):
        d = tmp_path / f"m{i}"
        d.mkdir()
        (d / "config.yaml").write_text(f"member: {i}\n")
        members.append(d)
    w = np.full((2, 3, 4), 0.5, dtype=np.float32)
    out = write_ensemble_dir(tmp_path / "ens", members, w, ["a", "b", "c"], {"temperature": 0.3})
    meta = json.loads((out / "ensemble.json").read_text())
    assert meta["n_members"] == 2 and meta["members"] == ["members/0", "members/1"] and meta["temperature"] == 0.3
    assert np.load(out / "weights.npy").shape == (2, 3, 4)
    assert (out / "members" / "1" / "config.yaml").read_text() == "member: 1\n"
    assert not (tmp_path / "ens.tmp").exists()
