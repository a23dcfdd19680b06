"""On the planted synthetic dataset, the cross-fitted ensemble beats its best member."""

from __future__ import annotations

import numpy as np
from mirage.data.synth import load_truth
from mirage.ensemble import Candidate, cross_fit, refit_weights, two_folds
from mirage.pipeline.ensemble import validation_runs, validation_targets


def test_cross_fitted_ensemble_beats_best_member_on_planted_runs(test_cfg, synth_root):
    """Members = the planted clean signal + member noise; each member is precise on other parcels."""
    cfg = test_cfg.with_overrides({"data.root": str(synth_root)})
    runs = validation_runs(cfg)
    targets = validation_targets(cfg, runs)  # the real h5 files through the real loaders
    _, arrays = load_truth(synth_root)
    planted = arrays["modality"] >= 0
    rng = np.random.default_rng(0)
    n_members, P = 3, cfg.data.n_parcels
    noise_sd = np.full((n_members, P), 3.0)
    for m in range(n_members):
        noise_sd[m, np.arange(P) % n_members == m] = 0.3  # member m is good on every third parcel
    preds = {}
    for key, run in runs.items():
        signal = arrays[f"signal/{key.subject}/{run.key}"]  # (n_trs, P) clean planted response
        noise = rng.normal(size=(n_members, *signal.shape)) * noise_sd[:, None, :] * signal.std(0).clip(1e-6)
        preds.setdefault(key.subject, {})[key.name] = signal[None] + noise
    subjects = [s for s in cfg.data.subjects if s in targets]
    folds = two_folds(sorted({k for s in subjects for k in targets[s]}))
    cands = [Candidate(f"m{m}", f"cfg{m}", (0,)) for m in range(n_members)]
    cf = cross_fit(
        cands, lambda i, e: {s: {k: v[i] for k, v in c.items()} for s, c in preds.items()}, targets, subjects, folds,
        top_k=n_members, n_members=n_members, temperature=cfg.ensemble.temperature,
    )
    s = cf.summary()
    assert s["ensemble_r"] > s["best_member_r"] + 0.05, s
    for f in cf.folds:
        assert set(f.fit_runs).isdisjoint(f.score_runs) and f.ensemble_r > f.best_member_r
    # weights refit on every validation run follow the precise member of each planted parcel
    w, _ = refit_weights(preds, targets, subjects, cfg.ensemble.temperature)
    top = w.mean(axis=1).argmax(axis=0)  # (P,)
    assert (top[planted] == (np.arange(P) % n_members)[planted]).mean() > 0.8
