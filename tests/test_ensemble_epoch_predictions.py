"""Training saves every epoch's whole-run validation predictions; the best epoch's equal the exported model's."""

from __future__ import annotations

import numpy as np
from mirage.pipeline.ensemble import member_predictions, validation_runs, validation_targets
from mirage.predictor import Predictor
from mirage.train.loop import MODEL_DIR, LocalSession, fit


def test_every_epoch_hands_over_whole_run_validation_predictions(train_cfg, feature_store, tmp_path):
    cfg = train_cfg.with_overrides({"train.epochs": 2})
    got: dict[int, dict] = {}
    summary = fit(cfg, LocalSession(tmp_path), store=feature_store,
                  on_val_predictions=lambda epoch, preds: got.__setitem__(epoch, preds))
    assert sorted(got) == [0, 1]
    runs = validation_runs(cfg)
    targets = validation_targets(cfg, runs)
    for preds in got.values():
        assert {s: set(c) for s, c in preds.items()} == {s: set(c) for s, c in targets.items()}
        for s, c in preds.items():
            for k, p in c.items():
                assert p.shape == targets[s][k].shape and p.dtype == np.float32 and np.isfinite(p).all()
    assert not np.allclose(got[0]["sub-01"][next(iter(got[0]["sub-01"]))], got[1]["sub-01"][next(iter(got[1]["sub-01"]))])
    # the best epoch's predictions are those of the exported model, predicted run by run
    best = summary["best_epoch"]
    predictor = Predictor.from_path(tmp_path / f"epoch_{best:04d}" / MODEL_DIR, device="cpu")
    exported = member_predictions(predictor, feature_store, runs, targets)[0]
    for s, c in exported.items():
        for k, p in c.items():
            np.testing.assert_allclose(got[best][s][k], p, rtol=1e-4, atol=1e-5)

    off: dict[int, dict] = {}
    fit(cfg.with_overrides({"ensemble.epoch_predictions": False, "train.epochs": 1}), LocalSession(tmp_path / "off"),
        store=feature_store, on_val_predictions=lambda e, p: off.__setitem__(e, p))
    assert off == {}


def test_logged_epoch_predictions_become_candidates_and_a_member_without_them_is_named(test_cfg, tmp_path):
    """Real MLflow store: per-epoch artifacts round-trip; a member without them enters with its exported predictions."""
    from mirage import tracking
    from mirage.distributed.sweep import SweepResult
    from mirage.ensemble import MemberSpec
    from mirage.pipeline.ensemble import TrainedMember, candidates
    from mirage.tracking.predictions import EpochPredictionLogger, epoch_predictions

    cfg = test_cfg.with_overrides({"tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    rng = np.random.default_rng(0)
    preds = {e: {"sub-01": {"s06e01a": rng.normal(size=(12, 3)).astype(np.float32)}} for e in range(3)}
    with_preds = tracking.start_run(cfg, "train", "m0")
    log = EpochPredictionLogger(cfg.tracking.uri, with_preds)
    for e, p in preds.items():
        log(e, p)
    without_preds = tracking.start_run(cfg, "train", "m1")
    files = epoch_predictions(cfg.tracking.uri, with_preds, tmp_path / "dl")
    assert sorted(files) == [0, 1, 2]
    assert epoch_predictions(cfg.tracking.uri, without_preds, tmp_path / "dl2") == {}
    members = [TrainedMember(MemberSpec(0, {"model.depth": 1}, 33), with_preds, ""),
               TrainedMember(MemberSpec(1, {"model.depth": 2}, 33), without_preds, "")]
    exported = [{}, {"sub-01": {"s06e01a": np.ones((12, 3), np.float32)}}]
    cands, load, without = candidates(cfg, SweepResult("s", "p", str(tmp_path), "val_r", "max"), members, exported,
                                      tmp_path / "c")
    assert [c.epochs for c in cands] == [(0, 1, 2), (0,)] and without == ["member-1"]
    np.testing.assert_array_equal(load(0, 2)["sub-01"]["s06e01a"], preds[2]["sub-01"]["s06e01a"])
    np.testing.assert_array_equal(load(1, 0)["sub-01"]["s06e01a"], 1.0)
    for run_id in (with_preds, without_preds):
        tracking.end_run(cfg.tracking.uri, run_id, "FINISHED")
