"""Batch prediction on Ray Data, `mirage predict` submissions and `mirage score`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from mirage.cli import main
from mirage.data.layout import Release
from mirage.predictor import Predictor
from scipy.stats import pearsonr
from test_submission import load_official

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_session(serve_cfg):
    import ray
    from mirage.distributed.cluster import init_ray

    init_ray(serve_cfg.ray)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def cfg_file(serve_cfg, tmp_path_factory):
    path = tmp_path_factory.mktemp("predict") / "config.yaml"
    serve_cfg.dump(path)
    return str(path)


def test_ray_data_predictions_equal_the_predictor(ray_session, serve_cfg, ensemble_model, feature_store):
    from mirage.distributed.predict import predict_split, split_items

    items = split_items(serve_cfg, "val")
    preds = predict_split(serve_cfg, str(ensemble_model), "val", runs_per_batch=3)
    offline = Predictor.from_path(ensemble_model, device="cpu")
    assert sum(len(v) for v in preds.values()) == len(items) >= 4
    for it in items:
        want = offline.predict_run(np.asarray(feature_store.read(it.key.stimulus)), it.key.subject, it.n_trs)
        np.testing.assert_allclose(preds[it.key.subject][it.key.name], want, rtol=1e-5, atol=1e-6)


def test_predict_writes_official_submissions(ray_session, serve_cfg, cfg_file, exported_model, feature_store, tmp_path):
    release = Release(serve_cfg.data.root)
    offline = Predictor.from_path(exported_model, device="cpu")
    for split in ("friends-s7", "ood"):
        assert main(["predict", "--model", str(exported_model), "--split", split, "--out", str(tmp_path), "--config", cfg_file]) == 0
        name, data = load_official(tmp_path / f"fmri_predictions_{split.replace('-', '_')}.zip")
        assert sorted(data) == sorted(serve_cfg.data.subjects)
        for sub in data:
            targets = release.target_samples(sub, split)
            assert sorted(data[sub]) == sorted(targets)
            for chunk, n_trs in targets.items():
                assert data[sub][chunk].shape == (n_trs, serve_cfg.data.n_parcels)
        sub, chunk = "sub-03", sorted(data["sub-03"])[0]
        want = offline.predict_run(np.asarray(feature_store.read(chunk)), sub, data[sub][chunk].shape[0])
        np.testing.assert_allclose(data[sub][chunk], want, rtol=1e-5, atol=1e-6)
    assert main(["score", str(tmp_path / "fmri_predictions_ood.zip"), "--config", cfg_file]) == 1  # no fMRI for OOD


def test_score_val_predictions(ray_session, serve_cfg, cfg_file, exported_model, tmp_path, capsys):
    from mirage.data.fmri import load_fmri
    from mirage.data.splits import split_runs

    assert main(["predict", "--model", str(exported_model), "--split", "val", "--out", str(tmp_path), "--config", cfg_file]) == 0
    capsys.readouterr()
    assert main(["score", str(tmp_path / "predictions_val.npz"), "--json", "--config", cfg_file]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with np.load(tmp_path / "predictions_val.npz") as z:
        preds = {k: z[k] for k in z.files}
    per_subject = {}
    for run in split_runs(Release(serve_cfg.data.root), serve_cfg.data, "val"):
        per_subject.setdefault(run.subject, []).append(run)
    want = []
    for sub, runs in per_subject.items():
        # the official rule: 5 TRs dropped at both edges of every chunk, then concatenated
        p = np.concatenate([preds[f"{sub}/{r.key.split('task-')[1]}"][5:-5] for r in runs])
        ys = [load_fmri(r.path, r.key).astype(np.float64) for r in runs]
        t = np.concatenate([((y - y.mean(0)) / y.std(0))[5:-5] for y in ys])
        r_sub = np.mean([pearsonr(p[:, j], t[:, j])[0] for j in range(p.shape[1])])
        assert scores[sub] == pytest.approx(r_sub, abs=1e-6)
        want.append(r_sub)
    assert scores["score"] == pytest.approx(np.mean(want), abs=1e-6)
