"""The one Predictor: loading every model layout and URI, window stitching, ensembles, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mirage.config import MODALITIES
from mirage.errors import DataError, ModelLoadError
from mirage.model_dirs import find_model_dir, model_kind
from mirage.predictor import Predictor, RunRequest
from mirage.tracking.models import load_predictor


@pytest.fixture(scope="module")
def predictor(exported_model) -> Predictor:
    return Predictor.from_path(exported_model, device="cpu")


@pytest.fixture(scope="module")
def run(feature_store):
    sid = sorted(feature_store.stimuli())[0]
    return sid, np.asarray(feature_store.read(sid))


def _manual_window(p: Predictor, feats: np.ndarray, subject: str, tr_start: int) -> np.ndarray:
    """The model on one window cut by hand (frames from the window rule, zero padding)."""
    cfg = p.cfg.data
    length = int(round(cfg.window_trs * cfg.tr * p.rate_hz))
    f0 = int(round((tr_start - cfg.hrf_delay_trs) * cfg.tr * p.rate_hz))
    x = np.zeros((length, *feats.shape[1:]), np.float32)
    for i in range(length):
        if 0 <= f0 + i < len(feats):
            x[i] = feats[f0 + i]
    model = p.members[0].model
    inputs = {m: torch.from_numpy(x[:, MODALITIES.index(m)]).permute(1, 0, 2)[None] for m in model.modalities}
    with torch.no_grad():
        y = model(inputs, torch.tensor([p.subjects.index(subject)]))
    return y[0].numpy()  # (window_trs, P)


def test_exported_model_predicts_every_tr_from_its_window(predictor, run, serve_cfg):
    sid, feats = run
    w = serve_cfg.data.window_trs
    n_trs = 2 * w + 3  # the last window is mostly padding
    out = predictor.predict_run(feats, "sub-02", n_trs)
    assert out.shape == (n_trs, serve_cfg.data.n_parcels) and out.dtype == np.float32
    assert np.isfinite(out).all()
    for start in (0, w, 2 * w):
        want = _manual_window(predictor, feats, "sub-02", start)[: n_trs - start]
        np.testing.assert_allclose(out[start : start + w], want, rtol=1e-4, atol=1e-5)
    other = predictor.predict_run(feats, "sub-03", n_trs)
    assert not np.allclose(out, other), "subjects must get their own heads"


def test_batching_runs_together_changes_nothing(predictor, feature_store):
    sids = sorted(feature_store.stimuli())[:3]
    reqs = [RunRequest(np.asarray(feature_store.read(s)), sub, n) for s, sub, n in zip(sids, ["sub-01", "sub-05", "sub-01"], [7, 20, 13])]
    together = predictor.predict_runs(reqs)
    for r, t in zip(reqs, together):
        np.testing.assert_allclose(t, predictor.predict_run(r.features, r.subject, r.n_trs), rtol=1e-5, atol=1e-6)


def test_ensemble_is_the_weighted_sum_of_its_members(ensemble_model, run):
    sid, feats = run
    ens = Predictor.from_path(ensemble_model, device="cpu")
    assert len(ens.members) == 2 and ens.weights.shape[:2] == (2, 4)
    members = [Predictor.from_path(ensemble_model / "members" / str(i), device="cpu") for i in range(2)]
    s = ens.subjects.index("sub-03")
    parts = [m.predict_run(feats, "sub-03", 17) for m in members]
    want = parts[0] * ens.weights[0, s] + parts[1] * ens.weights[1, s]
    np.testing.assert_allclose(ens.predict_run(feats, "sub-03", 17), want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(parts[0], parts[1])


def test_published_format_loads(conformance_dir, tmp_path):
    p = Predictor.from_path(conformance_dir / "tiny_a", device="cpu")
    assert model_kind(conformance_dir / "tiny_a") == "published" and p.subjects == ["sub-01", "sub-02", "sub-03", "sub-05"]
    n_layers = 5
    feats = np.random.default_rng(0).standard_normal((64, 3, n_layers, p.dim)).astype(np.float32)
    out = p.predict_run(feats, p.subjects[0], 21)
    assert out.shape == (21, p.n_parcels) and np.isfinite(out).all()


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda f: (f, "sub-04", 10), "unknown subject"),
        (lambda f: (f[:, :2], "sub-01", 10), "shape"),
        (lambda f: (f[..., :-1], "sub-01", 10), "shape"),
        (lambda f: (f[0], "sub-01", 10), "shape"),
        (lambda f: (f.astype(np.int32), "sub-01", 10), "float"),
        (lambda f: (np.where(np.arange(f.shape[0])[:, None, None, None] == 3, np.nan, f), "sub-01", 10), "NaN"),
        (lambda f: (f, "sub-01", 0), "n_trs"),
        (lambda f: (f, "sub-01", 2.5), "n_trs"),
    ],
)
def test_bad_requests_raise_data_errors(predictor, run, mutate, match):
    feats, subject, n_trs = mutate(run[1].astype(np.float32))
    with pytest.raises(DataError, match=match):
        predictor.predict_run(feats, subject, n_trs)


def test_unknown_directories_are_refused(tmp_path, exported_model):
    with pytest.raises(ModelLoadError, match="not a model directory"):
        Predictor.from_path(tmp_path)
    with pytest.raises(ModelLoadError, match="not found"):
        Predictor.from_path(tmp_path / "nope")
    nested = tmp_path / "download" / "artifacts"
    nested.mkdir(parents=True)
    import shutil

    shutil.copytree(exported_model, nested / "predictor")
    assert find_model_dir(tmp_path / "download") == nested / "predictor"


def test_from_uri_reads_runs_and_registered_models(serve_cfg, ensemble_model, run, tmp_path):
    from mirage import tracking

    cfg = serve_cfg.with_overrides(
        {"tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "ensemble.registry_name": "mirage-test"}
    )
    exp = tracking.ensure_experiment(cfg.tracking)
    c = tracking.client(cfg.tracking.uri)
    run_id = c.create_run(exp).info.run_id
    c.log_artifacts(run_id, str(ensemble_model), "ensemble")
    sid, feats = run
    want = Predictor.from_path(ensemble_model, device="cpu").predict_run(feats, "sub-01", 12)
    by_run = load_predictor(f"runs:/{run_id}/ensemble", tracking_uri=cfg.tracking.uri, device="cpu")
    np.testing.assert_allclose(by_run.predict_run(feats, "sub-01", 12), want, rtol=1e-6)
    tracking.log_pyfunc_model(cfg, run_id, ensemble_model)
    c.set_terminated(run_id)
    uri = f"models:/mirage-test@{cfg.ensemble.alias}"
    by_alias = load_predictor(uri, tracking_uri=cfg.tracking.uri, device="cpu", cache_dir=tmp_path / "dl")
    assert by_alias.source == uri and len(by_alias.members) == 2
    np.testing.assert_allclose(by_alias.predict_run(feats, "sub-01", 12), want, rtol=1e-6)
    with pytest.raises(ModelLoadError, match="cannot download"):
        load_predictor("models:/mirage-test@nope", tracking_uri=cfg.tracking.uri)
