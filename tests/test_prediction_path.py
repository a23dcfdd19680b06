"""One prediction path: training inputs, a live model, its export, ensembles, analysis and batch prediction agree."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mirage.config import MODALITIES
from mirage.data.run_key import RunKey, nest
from mirage.data.windows import slice_padded
from mirage.distributed.predict import PredictActor, split_items
from mirage.ensemble import combine
from mirage.errors import MirageError
from mirage.features.model_inputs import model_inputs, window_rows
from mirage.model import build_model, save_exported
from mirage.pipeline.ensemble import member_predictions, validation_runs, validation_targets
from mirage.predictor import Predictor, RunRequest, predict_stored, stored_runs
from mirage.train.batch import HostBatch
from mirage.train.data import WindowDataset
from mirage.valpred import predict_validation


@pytest.fixture(scope="module")
def live(serve_cfg, feature_store, tmp_path_factory):
    """A model as training holds it, and its export."""
    torch.manual_seed(5)
    dims = {m: (feature_store.n_layers, feature_store.dim) for m in MODALITIES}
    model = build_model(serve_cfg.model, dims, serve_cfg.data.n_parcels, len(serve_cfg.data.subjects),
                        serve_cfg.data.window_trs)
    export = save_exported(tmp_path_factory.mktemp("live") / "model", model.eval(), serve_cfg,
                           {"feature_key": feature_store.key})
    return model, export


@pytest.fixture(scope="module")
def val_lengths(serve_cfg):
    runs = validation_runs(serve_cfg)
    targets = validation_targets(serve_cfg, runs)
    return runs, targets, {k: len(targets[k.subject][k.name]) for k in runs}


def test_window_rows_and_model_inputs_match_the_training_batch(feature_store):
    stim = sorted(feature_store.stimuli())[0]
    feats = feature_store.read(stim)  # (n_frames, 3, L, D) float16 memmap
    layers = [0, feature_store.n_layers - 1]
    starts = [-5, 3, len(feats) - 4]  # before the run, inside, past its end
    rows = [window_rows(feats, s, s + 12, layers) for s in starts]
    for s, r in zip(starts, rows):
        np.testing.assert_array_equal(r, slice_padded(np.asarray(feats), s, s + 12)[:, :, layers])
        assert r.dtype == np.float16
    batch = np.stack(rows)  # (B, T, 3, L, D)
    hb = HostBatch(batch, np.zeros(3, np.int64), np.zeros((3, 2, 4), np.float32), np.ones((3, 2), bool))
    trained = hb.to(torch.device("cpu"), list(MODALITIES)).features
    for b, r in enumerate(rows):
        one = model_inputs(r, ["text", "vision"])
        assert set(one) == {"text", "vision"} and one["text"].shape == (1, 2, 12, feats.shape[3])
        for m in one:
            want = torch.from_numpy(r[:, MODALITIES.index(m)].astype(np.float32)).permute(1, 0, 2)
            torch.testing.assert_close(one[m][0], want, rtol=0, atol=0)
            torch.testing.assert_close(trained[m][b], want, rtol=0, atol=0)
    full = model_inputs(np.stack([slice_padded(np.asarray(feats), s, s + 12) for s in starts]), ["audio"], layers=layers)
    torch.testing.assert_close(full["audio"], trained["audio"], rtol=0, atol=0)


def test_a_live_model_predicts_as_its_export(live, serve_cfg, feature_store, val_lengths):
    model, export = live
    runs, _, lengths = val_lengths
    reqs = stored_runs(feature_store, lengths)
    wrapped = Predictor.from_model(model, serve_cfg, None, "cpu", n_layers=feature_store.n_layers)
    loaded = Predictor.from_path(export, device="cpu")
    for a, b in zip(wrapped.predict_runs(reqs), loaded.predict_runs(reqs)):
        np.testing.assert_array_equal(a, b)
    # the per-epoch validation predictions of training are those of the export, keyed by run name
    ds = WindowDataset(serve_cfg, "val", feature_store)
    during = predict_validation(model, serve_cfg, ds, torch.device("cpu"))
    after = nest(predict_stored(loaded, feature_store, lengths))
    assert {s: sorted(v) for s, v in during.items()} == {s: sorted(v) for s, v in after.items()}
    for s, v in during.items():
        for name, p in v.items():
            np.testing.assert_array_equal(p, after[s][name])
    assert all(isinstance(k, RunKey) for k in runs)


def test_drop_ablates_modalities_in_every_window(live, serve_cfg, feature_store):
    model, export = live
    p = Predictor.from_path(export, device="cpu")
    stim = sorted(feature_store.stimuli())[0]
    feats = feature_store.read(stim)
    n_trs = serve_cfg.data.window_trs + 2
    full, no_text = p.predict_run(feats, "sub-02", n_trs), p.predict_run(feats, "sub-02", n_trs, drop=("text",))
    assert not np.allclose(full, no_text)
    w = p.cfg.data
    f0 = int(round(-w.hrf_delay_trs * w.tr * p.rate_hz))
    length = int(round(w.window_trs * w.tr * p.rate_hz))
    x = model_inputs(window_rows(feats, f0, f0 + length), p.modalities)
    with torch.no_grad():
        want = model(x, torch.tensor([p.subject_index("sub-02")]), drop=("text",))[0].numpy()
    np.testing.assert_allclose(no_text[: w.window_trs], want, rtol=1e-5, atol=1e-6)


def test_ensemble_is_fitted_through_the_object_it_saves(exported_model, live, serve_cfg, feature_store, val_lengths,
                                                        tmp_path):
    _, second = live
    runs, targets, lengths = val_lengths
    members = Predictor.from_members([exported_model, second], device="cpu")
    with pytest.raises(MirageError, match="without ensemble weights"):
        members.predict_runs(stored_runs(feature_store, lengths))
    per_member = member_predictions(members, feature_store, runs, targets)  # what ensemble fitting scores
    for i in range(2):  # each member alone, through the same path
        alone = nest(predict_stored(members.member(i), feature_store, lengths))
        for s, v in alone.items():
            for name, p in v.items():
                np.testing.assert_array_equal(per_member[i][s][name], p)
    rng = np.random.default_rng(1)
    w = rng.uniform(0.1, 1, (2, len(members.subjects), members.n_parcels))
    w = (w / w.sum(0, keepdims=True)).astype(np.float32)
    members.set_weights(w)
    fitted = predict_stored(members, feature_store, lengths)
    saved = Predictor.from_path(members.save(tmp_path / "ens", {"temperature": 0.3}), device="cpu")
    np.testing.assert_array_equal(np.load(tmp_path / "ens" / "weights.npy"), w)
    for k, p in predict_stored(saved, feature_store, lengths).items():
        np.testing.assert_array_equal(p, fitted[k])
        j = members.subject_index(k.subject)
        stacked = np.stack([per_member[i][k.subject][k.name] for i in range(2)])
        np.testing.assert_array_equal(p, combine(stacked, w[:, j].astype(np.float64)))


def test_batch_prediction_actor_predicts_as_the_predictor(ensemble_model, serve_cfg, feature_store):
    """The Ray Data callable, called in process, gives the Predictor's arrays under the run's key."""
    items = split_items(serve_cfg, "val")[:3]
    actor = PredictActor(str(ensemble_model), serve_cfg.with_overrides({"serve.gpus_per_replica": 0}).to_dict())
    rows = [i.row() for i in items]
    out = actor({k: np.array([r[k] for r in rows]) for k in rows[0]})
    offline = Predictor.from_path(ensemble_model, device="cpu")
    want = offline.predict_runs([RunRequest(feature_store.read(i.key.stimulus), i.key.subject, i.n_trs) for i in items])
    for j, i in enumerate(items):
        assert (out["subject"][j], out["stimulus"][j], int(out["repeat"][j])) == (i.key.subject, i.key.stimulus, i.key.repeat)
        got = np.frombuffer(out["prediction"][j], np.float32).reshape(out["n_trs"][j], out["n_parcels"][j])
        np.testing.assert_array_equal(got, want[j])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the accelerator path of model_inputs is not run")
def test_model_inputs_on_cuda_equal_the_cpu_cast(feature_store):
    stim = sorted(feature_store.stimuli())[0]
    rows = np.stack([window_rows(feature_store.read(stim), s, s + 10) for s in (-4, 2)])  # (2, T, 3, L, D) float16
    cpu = model_inputs(rows, list(MODALITIES))
    for pin in (False, True):
        gpu = model_inputs(rows, list(MODALITIES), "cuda", pin=pin)
        for m in MODALITIES:
            assert gpu[m].dtype == torch.float32 and gpu[m].is_contiguous()
            torch.testing.assert_close(gpu[m].cpu(), cpu[m], rtol=0, atol=0)
