"""Interpretability math on small arrays with a known answer."""

from __future__ import annotations

import json

import numpy as np

from mirage.analysis import analyze, dominance, layer_profile, modality_subsets, write_analysis

MODS = ["vision", "audio", "text"]


def test_layer_profile_averages_heads_queries_frames_and_batches():
    a = np.zeros((2, 3, 2, 4, 5))
    a[..., 1] = 1.0  # all attention on layer 1
    b = np.full((1, 3, 2, 4, 5), 0.2)
    prof = layer_profile([a, b])
    n_a, n_b = 2 * 3 * 2 * 4, 1 * 3 * 2 * 4
    expect = (np.eye(5)[1] * n_a + 0.2 * n_b) / (n_a + n_b)
    np.testing.assert_allclose(prof, expect)
    np.testing.assert_allclose(prof.sum(), 1.0)


def test_modality_subsets_cover_all_seven():
    subs = modality_subsets(MODS)
    assert len(subs) == 7 and subs[0] == ("vision",) and subs[-1] == tuple(MODS)


def test_dominance_picks_largest_drop_with_share_as_strength():
    full = np.array([0.5, 0.5, 0.5, 0.5])
    without = {
        "vision": np.array([0.1, 0.5, 0.5, 0.6]),
        "audio": np.array([0.4, 0.2, 0.5, 0.6]),
        "text": np.array([0.5, 0.5, 0.3, 0.6]),
    }
    d = dominance(full, without, MODS)
    assert d.names()[:3] == ["vision", "audio", "text"]
    np.testing.assert_allclose(d.strength[:3], [0.4 / 0.5, 1.0, 1.0])
    assert d.strength[3] == 0.0  # no removal lowers r


def test_analyze_recovers_planted_modalities_from_ablation(tmp_path):
    """Each parcel is driven by one modality; a predictor that loses that modality loses the parcel."""
    rng = np.random.default_rng(0)
    T, P = 200, 9
    sources = {m: rng.normal(size=(T,)) for m in MODS}
    planted = [MODS[p % 3] for p in range(P)]
    target = np.stack([sources[planted[p]] + 0.5 * rng.normal(size=T) for p in range(P)], axis=1)
    targets = {"sub-01": {"run": target}, "sub-02": {"run": target}}

    def predict(drop):
        pred = np.stack([sources[planted[p]] * (planted[p] not in drop) + 0.1 * rng.normal(size=T) for p in range(P)], 1)
        return {s: {"run": pred} for s in targets}

    attn = {"vision": [rng.dirichlet(np.ones(4), size=(2, 5, 2, 3))]}
    res = analyze(predict, targets, ["sub-01", "sub-02"], MODS, attention=attn)
    assert res.dominance.names() == planted
    assert res.subset_r["vision+audio+text"] > res.subset_r["vision"] > 0
    assert res.val_r.shape == (2, P) and res.subject_r.shape == (2,)
    files = write_analysis(res, tmp_path)
    names = {f.name for f in files}
    assert {"val_r.npy", "dominant_modality.npy", "dominance_strength.npy", "layer_attention_vision.npy",
            "dominance.png", "subset_r.png", "layer_attention.png", "summary.json"} <= names
    assert json.loads((tmp_path / "summary.json").read_text())["dominant_counts"]["vision"] == 3
    assert (tmp_path / "dominance.png").read_bytes()[:4] == b"\x89PNG"
