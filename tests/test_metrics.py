"""Metrics against scipy on float64, identity and shuffled sanity checks, the Algonauts rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr

from mirage.data.fmri import zscore
from mirage.errors import DataError
from mirage.metrics import (
    algonauts_score,
    chunk_group,
    noise_ceiling_normalized,
    noise_ceiling_split_half,
    pearson_r,
    pearson_r_torch,
    sem,
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


def _twin_data(rng, shape, dtype):
    """pred, target (..., T, P) of ``dtype``; column 1 of pred, column 2 of target and column 3 of both constant."""
    y = rng.standard_normal(shape)
    x = 0.4 * y + rng.standard_normal(shape)
    x[..., 1] = 0.1
    y[..., 2] = -1234.5
    x[..., 3], y[..., 3] = 3.0, 7.0
    return x.astype(dtype), y.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(60, 6), (3, 40, 6)])
@pytest.mark.parametrize("masked", [False, True])
def test_numpy_and_torch_twins_agree(dtype, shape, masked):
    """Same r from both twins, masked or not, float32 or float64, constant columns ~0 in both."""
    rng = np.random.default_rng(5)
    x, y = _twin_data(rng, shape, dtype)
    mask = rng.random(shape[:-1]) > 0.3 if masked else None
    r_np = pearson_r(x, y, mask)
    r_t = pearson_r_torch(torch.from_numpy(x), torch.from_numpy(y), None if mask is None else torch.from_numpy(mask))
    assert r_t.dtype == torch.from_numpy(x).dtype and r_np.dtype == np.float64
    assert r_np.shape == tuple(r_t.shape) == shape[:-2] + (shape[-1],)
    atol = 1e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(r_t.numpy(), r_np, rtol=0, atol=atol)
    np.testing.assert_allclose(r_np[..., 1:4], 0.0, atol=atol)
    assert np.abs(r_np[..., [0, 4, 5]]).min() > 1e-3  # the other columns are real correlations
    # both against scipy, one column at a time over the rows that count
    xs, ys = x.reshape(-1, *shape[-2:]), y.reshape(-1, *shape[-2:])  # (B, T, P)
    ms = np.ones(xs.shape[:2], bool) if mask is None else mask.reshape(xs.shape[:2])
    for b in range(len(xs)):
        for j in (0, 4, 5):
            expected = pearsonr(xs[b, ms[b], j].astype(np.float64), ys[b, ms[b], j].astype(np.float64)).statistic
            np.testing.assert_allclose(r_np.reshape(-1, shape[-1])[b, j], expected, rtol=0, atol=1e-12)
            np.testing.assert_allclose(r_t.numpy().reshape(-1, shape[-1])[b, j], expected, rtol=0, atol=atol)


def test_twins_masked_rows_do_not_matter_and_empty_mask_gives_zero():
    rng = np.random.default_rng(6)
    x, y = _twin_data(rng, (2, 30, 6), np.float64)
    mask = np.ones((2, 30), bool)
    mask[0, ::4] = False
    mask[1] = False  # no row counts
    x2 = x.copy()
    x2[~mask] = 1e6
    for xx in (x, x2):
        r_np = pearson_r(xx, y, mask)
        r_t = pearson_r_torch(torch.from_numpy(xx), torch.from_numpy(y), torch.from_numpy(mask)).numpy()
        np.testing.assert_allclose(r_t, r_np, rtol=0, atol=1e-10)
        assert np.all(r_np[1] == 0.0) and np.all(r_t[1] == 0.0)
    np.testing.assert_allclose(pearson_r(x2, y, mask), pearson_r(x, y, mask), rtol=0, atol=1e-10)


def test_streaming_accumulator_agrees_with_twins():
    """The training loop's one-pass r (sums that add across ranks) equals the two-pass twins."""
    from mirage.train.steps import PearsonAccumulator

    rng = np.random.default_rng(7)
    x, y = _twin_data(rng, (4, 25, 6), np.float32)
    mask = rng.random((4, 25)) > 0.2
    acc = PearsonAccumulator(1, 6)
    for b in range(4):  # one window per batch
        acc.update(torch.from_numpy(x[b:b + 1]), torch.from_numpy(y[b:b + 1]), torch.from_numpy(mask[b:b + 1]),
                   torch.zeros(1, dtype=torch.long))
    rows = mask.reshape(-1)
    r_np = pearson_r(x.reshape(-1, 6), y.reshape(-1, 6), rows)
    np.testing.assert_allclose(acc.compute().numpy()[0], r_np, rtol=0, atol=1e-6)


@pytest.mark.parametrize("ddof", [0, 1])
def test_zscore_matches_scipy_for_both_conventions(ddof):
    """Training targets use ddof 1, scoring targets ddof 0; constant parcels become 0."""
    from scipy.stats import zscore as scipy_zscore

    rng = np.random.default_rng(8)
    y = (rng.standard_normal((40, 5)) * 3 + 2).astype(np.float32)
    y[:, 4] = 0.25
    z = zscore(y, ddof=ddof)
    assert z.dtype == np.float32
    np.testing.assert_allclose(z[:, :4], scipy_zscore(y[:, :4].astype(np.float64), axis=0, ddof=ddof), atol=1e-6)
    assert np.all(z[:, 4] == 0.0)
    np.testing.assert_allclose(z[:, :4].std(0, ddof=ddof), 1.0, atol=1e-5)
    assert not np.allclose(zscore(y, ddof=0)[:, :4], zscore(y, ddof=1)[:, :4])


def test_scoring_zscore_has_no_threshold():
    """``eps=0``: a column whose float64 std is tiny but not 0 is still scaled (the scoring targets' rule)."""
    y = np.zeros((10, 2), np.float32)
    y[:, 0] = np.linspace(0, 1e-9, 10)
    z = zscore(y, eps=0.0, ddof=0)
    np.testing.assert_allclose(z[:, 0].std(), 1.0, atol=1e-5)
    assert np.all(z[:, 1] == 0.0)
    assert np.all(zscore(y, ddof=0)[:, 0] == 0.0)  # the default threshold zeroes it


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


def test_sem_matches_scipy():
    from scipy.stats import sem as scipy_sem

    x = np.random.default_rng(3).normal(size=9)
    assert sem(x) == pytest.approx(float(scipy_sem(x)))
    assert sem(np.array([0.4])) == 0.0 and sem(np.array([])) == 0.0
