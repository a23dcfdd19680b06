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
    fold_r,
    refit_weights,
    softmax_weights,
    two_folds,
    weight_entropy,
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


def test_two_folds_keep_episodes_together_and_need_two_runs():
    a, b = two_folds(["s06e02a", "s06e01a", "s06e01b", "s06e02b", "s06e03a", "s06e03b#2"])
    assert a == ["s06e01a", "s06e01b", "s06e03a", "s06e03b#2"] and b == ["s06e02a", "s06e02b"]
    assert two_folds(["s06e01b", "s06e01a"]) == (["s06e01a"], ["s06e01b"])  # one episode: its halves split
    with pytest.raises(MirageError, match="at least 2 validation runs"):
        two_folds(["s06e01a"])


def test_fold_r_is_the_official_form_checked_with_scipy():
    rng = np.random.default_rng(2)
    subjects, runs, T, P = ["sub-01", "sub-02"], ["r1", "r2", "r3"], 30, 4
    targets = {s: {k: rng.normal(size=(T, P)) for k in runs} for s in subjects}
    preds = {s: {k: t + rng.normal(size=t.shape) for k, t in c.items()} for s, c in targets.items()}
    r, pooled = fold_r(preds, targets, subjects, ["r1", "r3"])
    for si, s in enumerate(subjects):
        p = np.concatenate([preds[s][k][5:-5] for k in ("r1", "r3")])
        t = np.concatenate([targets[s][k][5:-5] for k in ("r1", "r3")])
        np.testing.assert_allclose(r[si], [pearsonr(p[:, j], t[:, j])[0] for j in range(P)], atol=1e-10)
    p = np.concatenate([preds[s][k][5:-5] for s in subjects for k in ("r1", "r3")])
    t = np.concatenate([targets[s][k][5:-5] for s in subjects for k in ("r1", "r3")])
    np.testing.assert_allclose(pooled, [pearsonr(p[:, j], t[:, j])[0] for j in range(P)], atol=1e-10)


def test_refit_weights_use_every_run_and_entropy_is_log_m_when_uniform():
    rng = np.random.default_rng(3)
    subjects, runs, M, T, P = ["sub-01"], ["r1", "r2"], 3, 30, 5
    targets = {s: {k: rng.normal(size=(T, P)) for k in runs} for s in subjects}
    preds = {s: {k: targets[s][k][None] + rng.normal(size=(M, T, P)) * (1 + np.arange(M))[:, None, None] for k in runs}
             for s in subjects}
    w, r = refit_weights(preds, targets, subjects, 0.3)
    t = np.concatenate([targets["sub-01"][k][5:-5] for k in runs])
    for m in range(M):
        p = np.concatenate([preds["sub-01"][k][m][5:-5] for k in runs])
        np.testing.assert_allclose(r[m, 0], [pearsonr(p[:, j], t[:, j])[0] for j in range(P)], atol=1e-10)
    np.testing.assert_allclose(w[:, 0, 2], softmax(r[:, 0, 2] / 0.3), rtol=1e-5)
    assert weight_entropy(np.full((4, 2, 3), 0.25)) == pytest.approx(np.log(4))
    assert weight_entropy(np.eye(3)[:, None, :]) == pytest.approx(0.0, abs=1e-9)


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
