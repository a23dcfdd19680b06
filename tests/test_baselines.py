"""Ridge baselines: the official challenge recipe on the fitted objects, TR averaging and windows
against direct loops, planted signal found, MLflow runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mirage.baselines import (
    BASELINES,
    design_matrix,
    fit_baseline,
    fit_reducer,
    single_index,
    tr_average,
    train_rows,
    window_index,
)
from mirage.config import BaselineConfig
from mirage.errors import DataError
from mirage.pipeline.baselines import run_baselines

OFFICIAL_ALPHAS = [1e6, 1e5, 1e4, 1e3, 100, 10, 1, 0.5, 0.1, 0.05, 0.01, 0.005, 0.001, 0.0001, 0.00001]


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


def test_window_takes_the_five_trs_ending_three_before_and_shifts_at_the_edges():
    idx = window_index(n_trs=20, n_feat=15, hrf_delay=3, window=5)
    assert idx.shape == (20, 5)
    np.testing.assert_array_equal(idx[12], [5, 6, 7, 8, 9])  # TRs 12-3-4 .. 12-3
    np.testing.assert_array_equal(idx[0], [0, 1, 2, 3, 4])  # before the run: the first 5 feature TRs
    np.testing.assert_array_equal(idx[6], [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(idx[17], [10, 11, 12, 13, 14])  # 10 .. 14 exactly fits
    np.testing.assert_array_equal(idx[19], [10, 11, 12, 13, 14])  # past the features: the last 5
    np.testing.assert_array_equal(window_index(4, 3, 3, 5)[3], [0, 1, 2, 2, 2])  # shorter than a window
    np.testing.assert_array_equal(single_index(6, 4, 3), [0, 0, 0, 0, 1, 2])  # text: the one TR t - 3
    np.testing.assert_array_equal(single_index(9, 4, 3)[-1], 3)


def test_design_windows_vision_and_audio_and_takes_one_text_tr():
    bc = BaselineConfig()
    n = 12
    reduced = {m: np.arange(n, dtype=np.float32)[:, None] * [1, 10] + off for m, off in
               (("vision", 0.0), ("audio", 1000.0), ("text", 5000.0))}  # (n_feature_trs, 2)
    x = design_matrix(reduced, n, bc)
    assert x.shape == (n, 2 * 5 + 2 * 5 + 2)
    t = 10
    np.testing.assert_array_equal(x[t, :10].reshape(5, 2)[:, 0], [3, 4, 5, 6, 7])
    np.testing.assert_array_equal(x[t, 10:20].reshape(5, 2)[:, 0], [1003, 1004, 1005, 1006, 1007])
    np.testing.assert_array_equal(x[t, 20:], [5007, 5070])


def test_reducer_keeps_250_components_or_every_audio_component():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 300)) @ rng.normal(size=(300, 300))
    x[3, 7] = np.nan  # NaN -> 0 before the scaler, as the official PCA step
    scaler, pca = fit_reducer(x, 250, seed=20200220)
    assert pca.n_components_ == 250 and np.isfinite(scaler.mean_).all()
    np.testing.assert_allclose(scaler.transform(np.nan_to_num(x)).std(0), 1.0, rtol=1e-3)
    _, whole = fit_reducer(x[:, :20], None, seed=20200220)
    assert whole.n_components_ == 20  # audio kept whole: PCA to its own width


def test_training_rows_leave_out_five_trs_at_both_edges():
    assert train_rows(40, 5) == slice(5, 35)
    with pytest.raises(DataError, match="excluding 5 TRs"):
        train_rows(10, 5)


def test_official_challenge_recipe_on_the_fitted_objects(train_cfg):
    from mirage.data.fmri import load_fmri
    from mirage.data.layout import Release
    from mirage.data.splits import split_runs
    from mirage.features.store import open_store

    cfg = train_cfg.with_overrides({"train.baseline.pca_components": 16})
    store = open_store(cfg.features)
    res = fit_baseline(cfg, "official-challenge", store)
    assert res.layers == [store.n_layers - 1]  # challenge_layer 1.0: the last layer
    assert {m: p.n_components_ for m, (_, p) in res.reducers.items()} == {
        "vision": 16, "text": 16, "audio": store.dim}  # audio kept whole
    train = [r for r in split_runs(Release(cfg.data.root), cfg.data, "train") if r.subject in cfg.data.subjects]
    for sub, model in res.models.items():
        np.testing.assert_allclose(sorted(model.alphas), sorted(OFFICIAL_ALPHAS))
        assert len(model.alphas) == 15 and model.alpha_.shape == (cfg.data.n_parcels,)  # one alpha per parcel
        n_trs = [len(load_fmri(r.path, r.key)) for r in train if r.subject == sub]
        assert res.n_train_rows[sub] == sum(n - 10 for n in n_trs)  # 5 TRs out at both edges of every run
        assert model.n_features_in_ == 16 * 5 + store.dim * 5 + 16
    assert np.isfinite(res.val_r_official) and res.val_r_official != res.val_r


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
    assert len(results["official-challenge"].layers) == 1

    c = MlflowClient(tracking_uri=cfg.tracking.uri, registry_uri=cfg.tracking.uri)
    runs = c.search_runs([c.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert {r.data.tags["mirage.baseline"] for r in runs} == set(BASELINES)
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.tags["mirage.kind"] == "baseline"
        name = run.data.tags["mirage.baseline"]
        assert run.data.metrics["val_r"] == pytest.approx(results[name].val_r)
        assert run.data.metrics["val_r_official"] == pytest.approx(results[name].val_r_official)
        assert "val_r_official/sub-01" in run.data.metrics and "pca_components/audio" in run.data.metrics
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
