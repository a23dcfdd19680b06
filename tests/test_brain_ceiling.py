"""Noise ceiling: normalising rule, user files, synthetic truth, split half from repeated runs."""

from __future__ import annotations

import numpy as np
import pytest

from mirage.brain.ceiling import load_ceiling, repeat_ceiling
from mirage.data.synth import load_truth
from mirage.errors import DataError
from mirage.metrics import noise_ceiling_normalized


def test_normalise_divides_where_the_ceiling_is_usable():
    r = np.array([0.3, 0.3, 0.3, -0.2, 0.3])
    c = np.array([0.6, 0.1, 0.05, 0.4, np.nan])
    out = noise_ceiling_normalized(r, c, min_ceiling=0.1)
    np.testing.assert_allclose(out[:2], [0.5, 3.0])  # at the threshold counts; not clipped at 1
    assert np.isnan(out[2]) and np.isnan(out[4])  # below the threshold, or no ceiling
    assert out[3] == pytest.approx(-0.5)
    stacked = noise_ceiling_normalized(np.stack([r, 2 * r]), c, min_ceiling=0.2)  # (subjects, P)
    assert stacked.shape == (2, 5) and np.isnan(stacked[:, 1]).all() and stacked[1, 0] == pytest.approx(1.0)
    with pytest.raises(DataError, match=r"expected r \(\.\.\., P\) and ceiling \(P,\)"):
        noise_ceiling_normalized(r, c[:4])


def test_user_ceiling_files(tmp_path):
    values = np.linspace(0.0, 0.9, 8)
    np.save(tmp_path / "c.npy", values)
    got = load_ceiling(None, 8, path=tmp_path / "c.npy")
    np.testing.assert_allclose(got.values, values)
    assert got.source == f"file {tmp_path / 'c.npy'}"
    (tmp_path / "c.tsv").write_text("noise_ceiling\n" + "\n".join(["0.5"] * 7 + ["n/a"]) + "\n")
    tsv = load_ceiling(tmp_path, 8, path=tmp_path / "c.tsv").values
    assert tsv.shape == (8,) and np.isnan(tsv[7]) and (tsv[:7] == 0.5).all()
    with pytest.raises(DataError, match=r"c\.npy: noise ceiling has shape \(8,\), expected \(9,\)"):
        load_ceiling(None, 9, path=tmp_path / "c.npy")
    np.save(tmp_path / "pct.npy", values * 100)
    with pytest.raises(DataError, match=r"pct\.npy: .*expected correlations in \[0, 1\]"):
        load_ceiling(None, 8, path=tmp_path / "pct.npy")
    (tmp_path / "bad.tsv").write_text("0.5\nabc\n")
    with pytest.raises(DataError, match="line 2 is 'abc'"):
        load_ceiling(None, 2, path=tmp_path / "bad.tsv")
    with pytest.raises(DataError, match="noise ceiling file not found"):
        load_ceiling(tmp_path, 8, path=tmp_path / "missing.npy")


def test_ceiling_from_truth_then_from_repeats(synth_root, synth_copy, test_cfg):
    n = test_cfg.data.n_parcels
    truth, _ = load_truth(synth_root)
    exact = np.array(truth["noise_ceiling"])
    got = load_ceiling(synth_root, n)
    assert got.source == "synthetic truth"
    np.testing.assert_array_equal(got.values, exact)
    with pytest.raises(DataError, match=r"truth\.npz: noise_ceiling has shape"):
        load_ceiling(synth_root, n + 1)
    # without the truth (a release), the repeated life01 runs give a split-half estimate
    est = load_ceiling(synth_copy, n)
    assert est.source.startswith("repeats (life01; ")
    planted = exact > 0
    assert est.values[planted].mean() > est.values[~planted].mean() + 0.2
    assert np.corrcoef(est.values, exact)[0, 1] > 0.6
    one = repeat_ceiling(synth_copy, "sub-01", n)
    assert one.shape == (n,) and ((one >= 0) & (one <= 1)).all()
    assert repeat_ceiling(synth_copy, "sub-05", n) is None  # sub-05 misses life01 _run-2
    assert load_ceiling(synth_copy, n, subject="sub-05") is None
