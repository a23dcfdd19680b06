"""The training loop in one process on the synthetic dataset: data contract, learning, resume, export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from mirage.train.data import WindowDataset
from mirage.train.loop import MODEL_DIR, STATE_FILE, VAL_R_FILE, LocalSession, fit


def _truth_modality(root: Path) -> np.ndarray:
    return np.array(json.loads((root / "_truth" / "truth.json").read_text())["modality"])


def _best_dir(root: Path, summary: dict) -> Path:
    return root / f"epoch_{summary['best_epoch']:04d}"


def test_window_dataset_batch_contract(train_cfg, feature_store):
    ds = WindowDataset(train_cfg, "train", feature_store)
    assert len(ds) > 0 and ds.n_parcels == train_cfg.data.n_parcels
    idx = [(0, True), (len(ds) - 1, True), (1, False)]
    batch = ds.batch(idx).to(torch.device("cpu"), train_cfg.model.modalities)
    B, W, P = 3, train_cfg.data.window_trs, ds.n_parcels
    L, D = len(ds.layers), feature_store.dim
    for m in ("vision", "audio", "text"):
        assert batch.features[m].shape == (B, L, ds.frames_per_window, D)
        assert batch.features[m].dtype == torch.float32
    assert batch.fmri.shape == (B, W, P) and batch.mask.shape == (B, W)
    assert batch.subject_id.dtype == torch.long
    assert not batch.mask[2].any()  # padding window: nothing real
    last = ds.refs[len(ds) - 1]
    assert int(batch.mask[1].sum()) == last.n_valid < W  # the run's tail is padded
    assert torch.all(batch.fmri[1][~batch.mask[1]] == 0)
    # fMRI rows are z-scored per parcel over the whole run
    ref = ds.refs[0]
    rows = [ds.load(i)[1][np.array(r.mask)] for i, r in enumerate(ds.refs) if r.fmri_key == ref.fmri_key
            and r.subject_index == ref.subject_index]
    run = np.concatenate(rows)
    np.testing.assert_allclose(run.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(run.std(0, ddof=1), 1, atol=1e-3)  # the sample std, as the reference


@pytest.fixture(scope="module")
def shuffled_root(synth_root, tmp_path_factory) -> Path:
    """The synthetic dataset with every fMRI run's rows permuted in time: no stimulus signal left."""
    out = tmp_path_factory.mktemp("shuffled") / "data"
    shutil.copytree(synth_root, out)
    rng = np.random.default_rng(0)
    for h5 in (out / "fmri").rglob("*.h5"):
        with h5py.File(h5, "r+") as f:
            for key in list(f.keys()):
                x = f[key][()]
                f[key][...] = x[rng.permutation(len(x))]
    return out


def test_short_run_learns_planted_signal(train_cfg, feature_store, shuffled_root, synth_root, tmp_path):
    planted = _truth_modality(synth_root) != "none"
    scores = {}
    for label, root in (("real", synth_root), ("shuffled", shuffled_root)):
        cfg = train_cfg.with_overrides({"data.root": str(root)})
        ckpts = tmp_path / label
        summary = fit(cfg, LocalSession(ckpts), store=feature_store)
        r = np.load(_best_dir(ckpts, summary) / VAL_R_FILE)  # (n_subjects, n_parcels)
        scores[label] = float(np.nanmean(r[:, planted]))
        losses = [h["train_loss"] for h in summary["history"]]
        assert losses[-1] < losses[0]
    # the planted parcels are predicted well above the control that saw the same features
    assert scores["real"] > 0.1, scores
    assert scores["real"] > scores["shuffled"] + 0.08, scores
    assert abs(scores["shuffled"]) < 0.08, scores


@pytest.mark.parametrize("overrides", [
    {},
    {"train.precision": "fp16", "model.modality_dropout_per": "batch"},  # loss scale and dropout draws resume
], ids=["fp32", "fp16-per-batch"])
def test_interrupted_run_resumes_to_the_same_loss_curve(train_cfg, feature_store, tmp_path, overrides):
    cfg = train_cfg.with_overrides({"train.epochs": 3, **overrides})
    straight = fit(cfg, LocalSession(tmp_path / "straight"), store=feature_store)

    class Crash(RuntimeError):
        pass

    def crash_in_epoch_1(metrics):
        if metrics["epoch"] == 1:
            raise Crash("killed")

    session = LocalSession(tmp_path / "resumed")
    with pytest.raises(Crash):
        fit(cfg, session, store=feature_store, on_epoch=crash_in_epoch_1)
    assert session.latest().name == "epoch_0000"
    resumed = fit(cfg, LocalSession(tmp_path / "resumed"), store=feature_store)
    assert [h["epoch"] for h in resumed["history"]] == [0, 1, 2]
    assert [h["start_epoch"] for h in resumed["history"]] == [0, 1, 1]  # epoch 0 was not redone
    np.testing.assert_allclose(
        [h["train_loss"] for h in resumed["history"]], [h["train_loss"] for h in straight["history"]], rtol=1e-5
    )
    np.testing.assert_allclose(
        [h["val_r"] for h in resumed["history"]], [h["val_r"] for h in straight["history"]], rtol=1e-4, atol=1e-6
    )
    if "loss_scale" in straight["history"][0]:
        assert [h["loss_scale"] for h in resumed["history"]] == [h["loss_scale"] for h in straight["history"]]


def test_best_checkpoint_exports_a_loadable_model(train_cfg, feature_store, tmp_path):
    from mirage.model.export import load_exported

    cfg = train_cfg.with_overrides({"train.epochs": 2})
    summary = fit(cfg, LocalSession(tmp_path), store=feature_store)
    best = _best_dir(tmp_path, summary)
    assert (best / STATE_FILE).is_file()
    model, saved_cfg, meta = load_exported(best / MODEL_DIR)
    assert saved_cfg.model == cfg.model and meta["feature_key"] == feature_store.key
    assert meta["n_parcels"] == cfg.data.n_parcels and meta["subjects"] == cfg.data.subjects
    assert meta["layers"] == list(range(feature_store.n_layers))
    # the exported weights reproduce the validation r recorded at the best epoch
    from mirage.train.steps import PearsonAccumulator, eval_batch

    val = WindowDataset(cfg, "val", feature_store)
    acc = PearsonAccumulator(len(cfg.data.subjects), val.n_parcels)
    batch = val.batch([(i, True) for i in range(len(val))]).to(torch.device("cpu"), cfg.model.modalities)
    eval_batch(model, batch, acc)
    np.testing.assert_allclose(acc.compute().numpy(), np.load(best / VAL_R_FILE), atol=1e-4)
