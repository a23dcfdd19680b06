"""Modality ablation on a trained model recovers the planted driving modality of the parcels."""

from __future__ import annotations

import numpy as np
import pytest
from mirage.analysis import analyze, write_analysis
from mirage.config import MODALITIES
from mirage.data.run_key import nest
from mirage.data.synth import load_truth
from mirage.pipeline.ensemble import validation_runs, validation_targets
from mirage.predictor import Predictor, predict_stored, stored_runs
from mirage.train.loop import MODEL_DIR, LocalSession, fit

pytestmark = pytest.mark.slow


def test_dominant_modality_matches_planted_modality(test_cfg, synth_root, feature_store, tmp_path):
    cfg = test_cfg.with_overrides({
        "data.root": str(synth_root),
        "train.epochs": 4,
        "train.lr": 3.0e-3,
        "model.n_queries": 8,
        "train.loader_threads": 0,
    })
    summary = fit(cfg, LocalSession(tmp_path / "ckpt", resume=False), store=feature_store)
    member = Predictor.from_path(tmp_path / "ckpt" / f"epoch_{summary['best_epoch']:04d}" / MODEL_DIR, device="cpu")
    runs = validation_runs(cfg)
    targets = validation_targets(cfg, runs)
    lengths = {k: len(targets[k.subject][k.name]) for k in runs}
    subjects = [s for s in cfg.data.subjects if s in targets]
    res = analyze(
        lambda drop: nest(predict_stored(member, feature_store, lengths, drop=drop)), targets, subjects,
        list(MODALITIES), attention=member.layer_attention(stored_runs(feature_store, lengths)),
    )
    files = {p.name for p in write_analysis(res, tmp_path / "analysis")}
    assert {"dominant_modality.npy", "dominance.png", "layer_attention_text.npy"} <= files
    for m, prof in res.layer_profiles.items():
        assert prof.shape == (feature_store.n_layers,) and np.isclose(prof.sum(), 1.0), m

    _, truth = load_truth(synth_root)
    planted = truth["modality"]  # index into MODALITIES, -1 = no signal
    r = res.val_r.mean(axis=0)  # (P,)
    learned = (planted >= 0) & (r > 0.1)
    assert learned.sum() >= 6, f"the model learned too few planted parcels (r: {np.round(r, 2)})"
    match = (res.dominance.dominant[learned] == planted[learned]).mean()
    assert match >= 0.7, f"dominant modality matches the planted one on {match:.0%} of {learned.sum()} parcels"
    # the full model beats every single modality on average
    assert res.subset_r["+".join(MODALITIES)] >= max(res.subset_r[m] for m in MODALITIES)
