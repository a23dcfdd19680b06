"""Fig. 4 views: per-head / per-query layer profiles, distance from uniform, spread over seeds."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mirage.analysis import (
    attention_spread,
    attention_views,
    distance_from_uniform,
    seed_spread,
    view_distances,
    write_attention_views,
)


def test_distance_is_zero_for_flat_and_one_for_one_hot():
    assert distance_from_uniform(np.full(7, 1 / 7)) == pytest.approx(0.0, abs=1e-12)
    assert distance_from_uniform(np.eye(7)[3]) == pytest.approx(1.0)
    half = distance_from_uniform(np.array([0.5, 0.5, 0, 0]))  # entropy log 2 of log 4
    assert half == pytest.approx(0.5)
    rows = distance_from_uniform(np.stack([np.full(4, 0.25), np.eye(4)[0]]))
    np.testing.assert_allclose(rows, [0.0, 1.0], atol=1e-12)
    with pytest.raises(ValueError, match="non-negative"):
        distance_from_uniform(np.array([0.5, -0.5, 1.0]))


def _batch(heads_profiles: np.ndarray, B: int = 2, T: int = 3, Q: int = 2) -> np.ndarray:
    """(B, T, heads, Q, L) with each head's profile on every query, frame and window."""
    a = np.broadcast_to(heads_profiles[None, None, :, None, :], (B, T, heads_profiles.shape[0], Q, heads_profiles.shape[1]))
    return np.ascontiguousarray(a)


def test_views_keep_a_flat_head_flat_and_a_peaked_head_peaked():
    L = 5
    flat, peaked = np.full(L, 1 / L), np.eye(L)[4]
    batches = [_batch(np.stack([flat, peaked])), _batch(np.stack([flat, peaked]), B=1)]
    v = attention_views(batches)
    assert v.per_head.shape == (2, L) and v.per_query.shape == (2, L) and v.per_head_query.shape == (2, 2, L)
    np.testing.assert_allclose(v.per_head[0], flat)
    np.testing.assert_allclose(v.per_head[1], peaked)
    np.testing.assert_allclose(v.mean, (flat + peaked) / 2)
    d = view_distances(v)
    np.testing.assert_allclose(d["per_head"], [0.0, 1.0], atol=1e-12)
    assert 0.0 < float(d["mean"]) < 1.0  # the average hides both: the per-head view tells them apart
    with pytest.raises(ValueError, match="no attention batches"):
        attention_views([])


def test_spread_over_seeds():
    L = 4
    seeds = [{"audio": attention_views([_batch(np.stack([p, p]))])}
             for p in (np.full(L, 0.25), np.eye(L)[0], np.array([0.5, 0.5, 0, 0]))]
    mean, std = seed_spread([s["audio"].mean for s in seeds])
    np.testing.assert_allclose(mean, [(0.25 + 1 + 0.5) / 3, 0.25, 0.25 / 3, 0.25 / 3])
    sp = attention_spread(seeds)["audio"]
    assert sp.n_seeds == 3
    assert sp.distance_mean == pytest.approx(0.5)
    assert sp.distance_std == pytest.approx(np.std([0.0, 1.0, 0.5]))
    np.testing.assert_allclose(sp.profile_std, std)
    with pytest.raises(ValueError, match="differ in shape"):
        seed_spread([np.ones(3), np.ones(4)])


def test_write_attention_views(tmp_path):
    L = 6
    views = {"text": attention_views([_batch(np.stack([np.full(L, 1 / L), np.eye(L)[2]]))])}
    spread = attention_spread([views, views])
    files = write_attention_views(views, tmp_path, spread)
    names = {f.name for f in files}
    assert {"attention_text.png", "attention_spread.png", "attention_distance.json",
            "attention_text_per_head.npy", "attention_text_per_query.npy", "attention_text_mean.npy"} <= names
    summary = json.loads((tmp_path / "attention_distance.json").read_text())
    np.testing.assert_allclose(summary["text"]["per_head"], [0.0, 1.0], atol=1e-9)
    assert summary["text"]["spread"]["n_seeds"] == 2 and summary["text"]["spread"]["distance_std"] == 0.0
