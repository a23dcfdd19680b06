"""Metrics against scipy on float64, identity and shuffled sanity checks, the Algonauts rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr

from mirage.errors import DataError
from mirage.metrics import (
    algonauts_score,
    chunk_group,
    noise_ceiling_normalized,
    noise_ceiling_split_half,
    pearson_r,
    pearson_r_torch,
)


@pytest.fixture
def xy():
    rng = np.random.default_rng(0)
    y = rng.standard_normal((50, 7))
    x = 0.5 * y + rng.standard_normal((50, 7))
    return x, y


def test_pearson_matches_scipy(xy):
    x, y = xy
    expected = np.array([pearsonr(x[:, j], y[:, j]).statistic for j in range(x.shape[1])])
    np.testing.assert_allclose(pearson_r(x, y), expected, rtol=1e-12, atol=1e-12)


def test_pearson_mask_equals_dropping_rows(xy):
    x, y = xy
    mask = np.arange(len(x)) % 3 != 0
    expected = np.array([pearsonr(x[mask, j], y[mask, j]).statistic for j in range(x.shape[1])])
    np.testing.assert_allclose(pearson_r(x, y, mask), expected, rtol=1e-12, atol=1e-12)
    # values in masked rows do not matter
    x2 = x.copy()
    x2[~mask] = 1e6
    np.testing.assert_allclose(pearson_r(x2, y, mask), expected, rtol=1e-10)


def test_pearson_batched_rows(xy):
    x, y = xy
    xb, yb = np.stack([x, y]), np.stack([y, x])  # (2, T, P)
    out = pearson_r(xb, yb)
    assert out.shape == (2, 7)
    np.testing.assert_allclose(out[0], pearson_r(x, y))


def test_identity_and_shuffled():
    rng = np.random.default_rng(1)
    y = rng.standard_normal((4000, 20))
    np.testing.assert_allclose(pearson_r(y, y), 1.0, atol=1e-12)
    np.testing.assert_allclose(pearson_r(-y, y), -1.0, atol=1e-12)
    shuffled = y[rng.permutation(len(y))]
    assert abs(pearson_r(shuffled, y).mean()) < 0.02
    assert np.abs(pearson_r(shuffled, y)).max() < 0.08


def test_constant_column_gives_zero_not_nan(xy):
    x, y = xy
    x = x.copy()
    x[:, 2] = 3.0
    r = pearson_r(x, y)
    assert np.isfinite(r).all() and r[2] == 0.0


def test_torch_matches_numpy(xy):
    x, y = xy
    mask = np.arange(len(x)) < 40
    rt = pearson_r_torch(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(mask))
    assert rt.dtype == torch.float64
    np.testing.assert_allclose(rt.numpy(), pearson_r(x, y, mask), rtol=1e-10)
    # batched float32 with gradients
    xb = torch.tensor(np.stack([x, x]), dtype=torch.float32, requires_grad=True)
    r = pearson_r_torch(xb, torch.tensor(np.stack([y, y]), dtype=torch.float32))
    assert r.shape == (2, 7)
    (-r.mean()).backward()
    assert torch.isfinite(xb.grad).all()


def test_chunk_groups():
    assert chunk_group("chaplin1") == "chaplin"
    assert chunk_group("pulpfiction2") == "pulpfiction"
    assert chunk_group("s07e01a") == "s07"


def test_algonauts_score_rule():
    """Drop 5 TRs per split edge, concatenate the splits of a movie, r per parcel, means."""
    rng = np.random.default_rng(2)
    t = {"sub-01": {"chaplin1": rng.standard_normal((30, 4)), "chaplin2": rng.standard_normal((25, 4)),
                    "wot1": rng.standard_normal((20, 4))}}
    p = {"sub-01": {k: v + rng.standard_normal(v.shape) for k, v in t["sub-01"].items()}}
    # the edges are garbage: the rule must ignore them
    for k in p["sub-01"]:
        p["sub-01"][k][:5] = 1e3
        p["sub-01"][k][-5:] = -1e3
    s = algonauts_score(p, t)
    cat = lambda d, ks: np.concatenate([d[k][5:-5] for k in ks])  # noqa: E731
    chap = pearson_r(cat(p["sub-01"], ["chaplin1", "chaplin2"]), cat(t["sub-01"], ["chaplin1", "chaplin2"])).mean()
    wot = pearson_r(cat(p["sub-01"], ["wot1"]), cat(t["sub-01"], ["wot1"])).mean()
    assert s.groups["sub-01"] == pytest.approx({"chaplin": chap, "wot": wot})
    assert s.score == pytest.approx((chap + wot) / 2)
    assert s.flat()["sub-01/chaplin"] == pytest.approx(chap)
    perfect = algonauts_score(t, t)
    assert perfect.score == pytest.approx(1.0)


def test_algonauts_score_errors():
    t = {"sub-01": {"chaplin1": np.zeros((20, 3))}}
    with pytest.raises(DataError, match="sub-01/chaplin1"):
        algonauts_score({"sub-01": {}}, t)
    with pytest.raises(DataError, match="shape"):
        algonauts_score({"sub-01": {"chaplin1": np.zeros((19, 3))}}, t)
    bad = np.zeros((20, 3))
    bad[3, 1] = np.nan
    with pytest.raises(DataError, match="NaN"):
        algonauts_score({"sub-01": {"chaplin1": bad}}, t)


def test_noise_ceiling_split_half_recovers_planted_ceiling():
    rng = np.random.default_rng(3)
    snr = np.array([0.25, 1.0, 4.0])
    s = rng.standard_normal((60000, 3))
    a = s + rng.standard_normal(s.shape) / np.sqrt(snr)
    b = s + rng.standard_normal(s.shape) / np.sqrt(snr)
    nc = noise_ceiling_split_half(a, b)
    np.testing.assert_allclose(nc, np.sqrt(snr / (1 + snr)), atol=0.02)
    # a perfect model (the clean signal) reaches the ceiling
    np.testing.assert_allclose(noise_ceiling_normalized(pearson_r(s, a), nc), 1.0, atol=0.04)


def test_noise_ceiling_normalized_excludes_unreliable():
    out = noise_ceiling_normalized(np.array([0.2, 0.1]), np.array([0.5, 0.01]))
    assert out[0] == pytest.approx(0.4) and np.isnan(out[1])
