"""``mirage predict-video``: one movie file -> features -> fMRI predictions with a trained model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from mirage.config import MODALITIES, load_config, resolve_paths
from mirage.errors import DataError, ModelLoadError
from mirage.predictor import Predictor
from mirage.pipeline.video import predict_video, stack_modalities, video_n_trs


def test_stack_modalities_pads_each_modality_with_zeros():
    rng = np.random.default_rng(0)
    feats = {"text": rng.normal(size=(5, 2, 3)), "audio": rng.normal(size=(4, 2, 3)), "vision": rng.normal(size=(4, 2, 3))}
    out = stack_modalities(feats)
    assert out.shape == (5, 3, 2, 3) and out.dtype == np.float32
    for k, m in enumerate(MODALITIES):
        n = len(feats[m])
        np.testing.assert_allclose(out[:n, k], feats[m], rtol=1e-6)
        assert not out[n:, k].any()
    with pytest.raises(DataError, match="missing"):
        stack_modalities({"text": feats["text"]})
    with pytest.raises(DataError, match="n_layers and dim"):
        stack_modalities({**feats, "audio": rng.normal(size=(4, 3, 3))})


def test_video_n_trs_rounds_the_duration():
    assert video_n_trs(15.15, 1.49) == 10
    assert video_n_trs(0.1, 1.49) == 1


def _synthetic_stimulus(serve_cfg, feature_store) -> tuple[str, Path, Path | None]:
    from mirage.data.layout import Release

    root = Path(serve_cfg.data.root)
    stim = Release(root).stimuli()
    sid = next(s for s in sorted(feature_store.stimuli()) if stim[s].transcript is not None)
    return sid, Path(root, stim[sid].video), Path(root, stim[sid].transcript)


@pytest.mark.slow
def test_cli_on_a_synthetic_movie_equals_the_store_path(serve_cfg, feature_store, exported_model, tmp_path):
    """The one-video path gives the store's features and the predictor's output for that run."""
    sid, video, transcript = _synthetic_stimulus(serve_cfg, feature_store)
    out = tmp_path / "pred.npy"
    cmd = [sys.executable, "-m", "mirage.cli", "predict-video", str(video), "--transcript", str(transcript),
           "--model", str(exported_model), "--subject", "sub-02", "--out", str(out), "--config", _write_config(serve_cfg, tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    pred = np.load(out)
    feats = load_file(str(tmp_path / "pred.features.safetensors"))
    assert set(feats) == set(MODALITIES)
    stored = np.asarray(feature_store.read(sid), np.float32)
    stacked = stack_modalities(feats)
    assert stacked.shape == stored.shape
    # the store holds float16: the one-video features round to the same numbers
    np.testing.assert_allclose(stacked.astype(np.float16).astype(np.float32), stored, rtol=0, atol=0)
    predictor = Predictor.from_path(exported_model, device="cpu")
    from mirage.data.media import MediaReader

    with MediaReader(video) as m:
        n_trs = video_n_trs(m.duration, serve_cfg.data.tr)
    assert pred.shape == (n_trs, serve_cfg.data.n_parcels) and pred.dtype == np.float32
    np.testing.assert_allclose(pred, predictor.predict_run(stacked, "sub-02", n_trs), rtol=1e-5, atol=1e-5)


def _write_config(cfg, tmp_path: Path) -> str:
    import yaml

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return str(path)


def test_cli_errors_are_one_line(exported_model, tmp_path):
    from mirage.cli import main

    assert main(["predict-video", str(tmp_path / "nope.mkv"), "--model", str(exported_model), "--subject", "sub-01"]) == 1


def test_fixture_movie_with_a_model_sized_for_the_fixture_backbone(features_fixture, fixture_native_features, tmp_path):
    """A model for the fixture backbone (5 layers x width 64) predicts the fixture movie.

    The features are the session's extraction of the fixture movie (checked against the reference
    in test_features_conformance); the predictions must equal the model on the reference's own
    features.
    """
    import torch

    from mirage.features.store import store_key
    from mirage.model import build_model, save_exported

    fx = features_fixture
    cfg = resolve_paths(load_config("paper", [
        f"features.model_id={fx / 'model'}", "features.dtype=float32", "features.gpus_per_actor=0",
        "model.hidden_dim=48", "model.depth=1", "model.heads=4", "model.n_queries=2",
        "data.window_trs=4", "data.n_parcels=20", f"outputs={tmp_path}",
    ]))
    torch.manual_seed(0)
    model = build_model(cfg.model, {m: (5, 64) for m in MODALITIES}, cfg.data.n_parcels, len(cfg.data.subjects), cfg.data.window_trs)
    export = save_exported(tmp_path / "model", model.eval(), cfg, {"feature_key": store_key(cfg.features)})
    pred = predict_video(cfg, fx / "stimulus.mkv", str(export), "sub-03", fx / "stimulus.tsv", features=fixture_native_features)
    ref = {m: v for m, v in load_file(str(fx / "features.safetensors")).items() if m in MODALITIES}
    assert pred.fmri.shape == (10, 20)  # round(15.15 s / 1.49 s) TRs
    expected = Predictor.from_path(export, device="cpu").predict_run(stack_modalities(ref), "sub-03", 10)
    np.testing.assert_allclose(pred.fmri, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ModelLoadError, match="trained on features"):
        other = cfg.with_overrides({"features.fusion": "posthoc"})
        predict_video(other, fx / "stimulus.mkv", str(export), "sub-03", fx / "stimulus.tsv", features=fixture_native_features)
