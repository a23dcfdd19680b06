"""Ridge baselines: TR averaging and delays against direct loops, planted signal found, MLflow runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mirage.baselines import BASELINES, delay_window, run_baselines, tr_average


def test_tr_average_matches_a_direct_loop():
    rng = np.random.default_rng(0)
    rate, tr, n_trs = 2.0, 1.49, 9
    feats = rng.normal(size=(27, 4))
    got = tr_average(feats, n_trs, tr, rate)
    for t in range(n_trs):
        frames = [i for i in range(len(feats)) if t * tr < (i + 1) / rate <= (t + 1) * tr]
        np.testing.assert_allclose(got[t], feats[frames].mean(0), rtol=1e-5)
    # a TR with no frame (slower frame rate than TRs) repeats the last average
    sparse = tr_average(feats[:3], 6, 1.0, 0.5)  # cutoffs at 2, 4, 6 s
    np.testing.assert_allclose(sparse[0], 0)
    np.testing.assert_allclose(sparse[2], sparse[1])


def test_delay_window_takes_the_trs_before_the_hrf_delay():
    x = np.arange(10, dtype=float)[:, None] * [1, 10]  # (n_trs, 2)
    w = delay_window(x, hrf_delay=3, window=5)
    assert w.shape == (10, 10)
    np.testing.assert_array_equal(w[9].reshape(5, 2)[:, 0], [2, 3, 4, 5, 6])  # TRs 9-3-4 .. 9-3
    np.testing.assert_array_equal(w[0].reshape(5, 2)[:, 0], [0, 0, 0, 0, 0])  # clipped at the run start


def test_baselines_find_the_planted_signal_and_are_tracked(train_cfg, synth_root, tmp_path):
    from mlflow import MlflowClient

    cfg = train_cfg.with_overrides(
        {"tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "train.baseline.pca_components": 32}
    )
    modality = np.array(json.loads((Path(synth_root) / "_truth" / "truth.json").read_text())["modality"])
    results = {r.name: r for r in run_baselines(cfg)}
    assert set(results) == set(BASELINES)
    for res in results.values():
        assert res.r.shape == (len(cfg.data.subjects), cfg.data.n_parcels)
        assert np.all(np.isfinite(res.alphas[~np.isnan(res.alphas)]))
    lin = results["native_linear"]
    assert lin.layers == list(range(len(lin.layers))) and len(lin.layers) > 1
    planted, noise = np.nanmean(lin.r[:, modality != "none"]), np.nanmean(lin.r[:, modality == "none"])
    assert planted > noise + 0.03, (planted, noise)
    assert len(results["challenge"].layers) == 1

    c = MlflowClient(tracking_uri=cfg.tracking.uri, registry_uri=cfg.tracking.uri)
    runs = c.search_runs([c.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert {r.data.tags["mirage.baseline"] for r in runs} == set(BASELINES)
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.tags["mirage.kind"] == "baseline"
        name = run.data.tags["mirage.baseline"]
        assert run.data.metrics["val_r"] == pytest.approx(results[name].val_r)
        assert "val_r/sub-01" in run.data.metrics
        assert {a.path for a in c.list_artifacts(run.info.run_id, "validation")} == {
            "validation/val_r.npy", "validation/alphas.npy"
        }


def test_baseline_command(train_cfg, capsys):
    from mirage.cli import main

    rc = main([
        "baseline", "--which", "native_linear", "--no-track",
        "--set", f"outputs={train_cfg.outputs}", "--set", f"data.root={train_cfg.data.root}",
        "--set", f"features.store={train_cfg.features.store}",
        *[x for o in ("data.synth.parcels=32", "data.n_parcels=32", "data.window_trs=8", "data.stride_trs=8",
                      "data.synth.seasons=[1, 6, 7]", "data.synth.movies=[life]") for x in ("--set", o)],
    ])
    assert rc == 0
    assert "native_linear: val r" in capsys.readouterr().out
    bad = main(["baseline", "--no-track", "--set", f"data.root={train_cfg.data.root}",
                "--set", "features.store=/nonexistent/store"])
    assert bad == 1  # a missing feature store is a clear one-line error, not a traceback
    assert "run `mirage extract` first" in capsys.readouterr().err
