"""Cross-fitted ensemble scores: choices come from one fold, scores from the other."""

from __future__ import annotations

import numpy as np
import pytest

from mirage.ensemble import Candidate, cross_fit, fold_r, softmax_weights, two_folds

SUBJECTS = ["sub-01", "sub-02"]
RUNS = ["s06e01a", "s06e01b", "s06e02a", "s06e02b"]
T, P = 40, 6


def _targets(seed=0):
    rng = np.random.default_rng(seed)
    return {s: {k: rng.normal(size=(T, P)) for k in RUNS} for s in SUBJECTS}


def _noisy(targets, sd, rng, runs=RUNS):
    """Predictions = target + noise of std ``sd`` on ``runs``, pure noise elsewhere."""
    return {s: {k: (t + rng.normal(size=t.shape) * sd) if k in runs else rng.normal(size=t.shape)
                for k, t in c.items()} for s, c in targets.items()}


def _setup(seed=0):
    """Three configs x one seed, two epochs each; epoch quality differs per fold for candidate 2."""
    targets = _targets(seed)
    rng = np.random.default_rng(seed + 1)
    a, b = two_folds(RUNS)
    preds = {
        (0, 0): _noisy(targets, 2.0, rng), (0, 1): _noisy(targets, 1.0, rng),
        (1, 0): _noisy(targets, 1.5, rng), (1, 1): _noisy(targets, 1.2, rng),
        (2, 0): _noisy(targets, 0.7, rng, runs=a), (2, 1): _noisy(targets, 0.7, rng, runs=b),
    }
    cands = [Candidate(f"c{i}", f"cfg{i}", (0, 1)) for i in range(3)]
    return targets, preds, cands, (a, b)


def _run(targets, preds, cands, folds, **kw):
    opts = dict(top_k=3, n_members=3, temperature=0.3)
    opts.update(kw)
    return cross_fit(cands, lambda i, e: preds[(i, e)], targets, SUBJECTS, folds, **opts)


def test_each_fold_is_scored_by_choices_made_on_the_other():
    targets, preds, cands, (a, b) = _setup()
    cf = _run(targets, preds, cands, (a, b))
    f0, f1 = cf.folds
    assert (f0.fit_runs, f0.score_runs, f1.fit_runs, f1.score_runs) == (a, b, b, a)
    # candidate 2 is good at epoch 0 on fold A only, at epoch 1 on fold B only: each fold picks its own
    assert f0.epochs[f0.members.index(2)] == 0 and f1.epochs[f1.members.index(2)] == 1
    # the weights are the softmax of the fit fold's r of the chosen epochs
    r_fit = np.stack([fold_r(preds[(i, e)], targets, SUBJECTS, a)[0] for i, e in zip(f0.members, f0.epochs)])
    np.testing.assert_allclose(f0.weights, softmax_weights(r_fit, 0.3), rtol=1e-5)
    # the member scores are on the other fold
    r_sc = [fold_r(preds[(i, e)], targets, SUBJECTS, b)[0].mean() for i, e in zip(f0.members, f0.epochs)]
    assert f0.mean_member_r == pytest.approx(np.mean(r_sc))
    s = cf.summary()
    assert s["ensemble_r"] == pytest.approx((f0.ensemble_r + f1.ensemble_r) / 2)
    assert s["best_member_r"] == pytest.approx((f0.best_member_r + f1.best_member_r) / 2)
    assert {"fold0/weight_entropy", "fold1/mean_member_r", "weight_entropy", "ensemble_r/sub-02"} <= set(s)
    assert 0 < s["weight_entropy"] <= np.log(3) + 1e-9
    assert 0 < s["member_corr"] < 1  # members share the target, not their noise


@pytest.mark.parametrize("scored", [0, 1])
def test_no_choice_depends_on_the_fold_it_is_scored_on(scored):
    """Replace one fold's fMRI and predictions by fresh noise: the choices scored there do not move."""
    targets, preds, cands, folds = _setup()
    before = _run(targets, preds, cands, folds)
    rng = np.random.default_rng(9)
    changed = folds[1 - scored]  # fold 0 fits on A and is scored on B: change B to test fold 0
    targets2 = {s: {k: (rng.normal(size=v.shape) if k in changed else v) for k, v in c.items()} for s, c in targets.items()}
    preds2 = {ce: {s: {k: (rng.normal(size=v.shape) if k in changed else v) for k, v in c.items()} for s, c in p.items()}
              for ce, p in preds.items()}
    after = _run(targets2, preds2, cands, folds)
    f, g = before.folds[scored], after.folds[scored]
    assert (f.members, f.epochs, f.configs, f.best) == (g.members, g.epochs, g.configs, g.best)
    np.testing.assert_array_equal(f.weights, g.weights)
    assert f.ensemble_r != pytest.approx(g.ensemble_r)  # the score does come from the changed fold


def test_a_member_best_only_on_fold_b_is_not_credited():
    targets = _targets(1)
    rng = np.random.default_rng(2)
    a, b = two_folds(RUNS)
    preds = {
        (0, 0): _noisy(targets, 1.0, rng),
        (1, 0): _noisy(targets, 1.1, rng),
        (2, 0): _noisy(targets, 0.0, rng, runs=b),  # planted: exact on fold B, noise on fold A
    }
    cands = [Candidate(f"c{i}", f"cfg{i}", (0,)) for i in range(3)]
    cf = _run(targets, preds, cands, (a, b))
    f0, f1 = cf.folds
    assert f0.members[f0.best] != 2  # chosen on A, where the planted member is noise
    assert f1.members[f1.best] == 2 and abs(f1.best_member_r) < 0.15  # chosen on B, credited on A: noise
    # picking the best member on the scored fold itself would credit the planted member with r = 1 on B
    leaky = np.mean([max(fold_r(preds[(i, 0)], targets, SUBJECTS, runs)[0].mean() for i in range(3)) for runs in (a, b)])
    assert cf.summary()["best_member_r"] < leaky - 0.25
    # with one config kept, fold A's choice never includes the planted config
    top1 = _run(targets, preds, cands, (a, b), top_k=1)
    assert top1.folds[0].configs != ["cfg2"] and top1.folds[1].configs == ["cfg2"]
    assert top1.folds[1].ensemble_r < 0.15


def test_the_summary_prints_both_folds_and_the_cross_fitted_means(test_cfg, capsys):
    from types import SimpleNamespace

    from mirage.commands.sweep import print_summary
    from mirage.distributed.sweep import SweepResult

    targets, preds, cands, folds = _setup()
    cf = _run(targets, preds, cands, folds)
    s = cf.summary()
    outcome = SimpleNamespace(members=[0, 1, 2], fit=cf, metrics=s, model_uri="models:/x@champion", version="1",
                              directory="/tmp/x")
    print_summary(test_cfg, SweepResult("demo", "run", "/tmp", "val_r", "max"), outcome)
    out = capsys.readouterr().out
    assert f"cross-fitted: ensemble r {s['ensemble_r']:.4f} vs best member r {s['best_member_r']:.4f}" in out
    assert "fold 0" in out and "fold 1" in out and f"{cf.folds[1].mean_member_r:.4f}" in out
