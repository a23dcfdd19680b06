"""A trained run as MLflow users expect it: a loadable pyfunc model, dataset inputs, system metrics, source tags."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from mirage import tracking
from mirage.config import PROJECT_ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tracked(train_cfg, tmp_path_factory):
    """One epoch trained in this process, tracked and logged as every training run is (no Ray)."""
    from mirage.distributed.train import TrainResult, best_export_dir, log_outputs, tracked_training, tracking_hooks
    from mirage.train.loop import MODEL_DIR, LocalSession, fit

    tmp = tmp_path_factory.mktemp("tracked")
    cfg = train_cfg.with_overrides({
        "train.epochs": 1, "train.loader_threads": 0, "train.storage": str(tmp / "runs"),
        "tracking.uri": f"sqlite:///{tmp / 'mlflow.db'}", "tracking.experiment": "models-test",
        "tracking.system_metrics_interval_s": 0.2,
    })
    t0 = time.perf_counter()
    with tracked_training(cfg, "one", kind="train", tracking_parent=None, tags=None) as tr:
        run_dir = Path(cfg.train.storage) / "one"
        summary = fit(cfg, LocalSession(run_dir, resume=False), **tracking_hooks(tr, 0))
        time.sleep(0.5)  # at least one system metrics sample however fast the epoch was
        best = best_export_dir(run_dir) or run_dir / f"epoch_{summary['best_epoch']:04d}"
        out = TrainResult(float(summary["best_val_r"]), int(summary["best_epoch"]), str(best / MODEL_DIR), None,
                          tr["run_id"])
        t1 = time.perf_counter()
        log_outputs(cfg, out)
        t_log = time.perf_counter() - t1
    print(f"tracked run {time.perf_counter() - t0:.1f}s, of which log_outputs {t_log:.2f}s")
    return cfg, tr["run_id"], out.model_dir


def _client(cfg) -> MlflowClient:
    return MlflowClient(tracking_uri=cfg.tracking.uri, registry_uri=cfg.tracking.uri)


def test_logged_model_loads_and_predicts_as_the_predictor(tracked, feature_store):
    import mlflow

    from mirage.predictor import Predictor

    cfg, run_id, model_dir = tracked
    mlflow.set_tracking_uri(cfg.tracking.uri)
    try:
        loaded = mlflow.pyfunc.load_model(f"runs:/{run_id}/{tracking.TRAINED_MODEL}")
    finally:
        mlflow.set_tracking_uri(None)
    sig = loaded.metadata.signature
    assert sig is not None and {c.name for c in sig.inputs.inputs} == {"subject", "features", "n_trs"}
    example = loaded.input_example
    assert example is not None and example["n_trs"] == 1
    predictor = Predictor.from_path(model_dir, device="cpu")
    expected = predictor.predict_run(np.asarray(example["features"], np.float32), example["subject"], 1)
    np.testing.assert_allclose(np.asarray(loaded.predict(example)[0]), expected, rtol=1e-5, atol=1e-6)

    stim = feature_store.stimuli()[0]
    req = {"subject": cfg.data.subjects[1], "features": np.asarray(feature_store.read(stim), np.float32), "n_trs": 12}
    np.testing.assert_allclose(
        np.asarray(loaded.predict(req)[0]), predictor.predict_run(req["features"], req["subject"], 12), rtol=1e-5, atol=1e-6
    )
    # the same URI through the platform's loader (serve, predict) and the preflight check
    tracking.check_model_uri(f"runs:/{run_id}/model", cfg.tracking.uri)
    served = tracking.load_predictor(f"runs:/{run_id}/model", tracking_uri=cfg.tracking.uri, device="cpu")
    np.testing.assert_array_equal(served.predict_run(req["features"], req["subject"], 12),
                                  predictor.predict_run(req["features"], req["subject"], 12))
    tag = _client(cfg).get_run(run_id).data.tags[tracking.MODEL_URI_TAG]
    assert tag.startswith("models:/m-")
    tracking.check_model_uri(tag, cfg.tracking.uri)
    by_id = tracking.load_predictor(tag, tracking_uri=cfg.tracking.uri, device="cpu")
    np.testing.assert_array_equal(by_id.predict_run(req["features"], req["subject"], 12),
                                  predictor.predict_run(req["features"], req["subject"], 12))
    # what the ensemble stage reuses of a finished trial: the exported directory inside the run's model
    got = tracking.download_run_artifacts(cfg.tracking.uri, run_id, "model", Path(model_dir).parent.parent / "dl")
    from mirage.model_dirs import find_model_dir

    assert (find_model_dir(got) / "model.safetensors").read_bytes() == (Path(model_dir) / "model.safetensors").read_bytes()


def test_run_has_dataset_inputs_with_digests(tracked):
    cfg, run_id, _ = tracked
    inputs = _client(cfg).get_run(run_id).inputs.dataset_inputs
    by_name = {i.dataset.name: i for i in inputs}
    assert len(inputs) == 3 and {"fmri-train", "fmri-val"} <= set(by_name)
    contexts = {name: {t.key: t.value for t in i.tags}["mlflow.data.context"] for name, i in by_name.items()}
    assert contexts["fmri-train"] == "training" and contexts["fmri-val"] == "validation"
    feats = [n for n in by_name if n.startswith("features-")]
    assert len(feats) == 1 and contexts[feats[0]] == "training"
    assert all(len(i.dataset.digest) == 16 for i in inputs)
    assert len({i.dataset.digest for i in inputs}) == 3
    # the digest follows the data: another split selection gives another digest
    other = tracking.fmri_dataset(cfg.with_overrides({"data.val": ["friends:s7"]}), "val")
    assert other.digest != by_name["fmri-val"].dataset.digest
    assert tracking.fmri_dataset(cfg, "val").digest == by_name["fmri-val"].dataset.digest


def test_system_metrics_and_source_tags(tracked):
    cfg, run_id, _ = tracked
    run = _client(cfg).get_run(run_id)
    assert "system/cpu_utilization_percentage" in run.data.metrics
    assert any(k.startswith("system/system_memory") for k in run.data.metrics)
    tags = run.data.tags
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"] and tags["mlflow.user"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True)
    if head.returncode == 0:
        assert tags["mlflow.source.git.commit"] == head.stdout.strip()


def test_system_metrics_off(test_cfg, tmp_path):
    cfg = test_cfg.with_overrides({
        "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "tracking.system_metrics": False,
        "tracking.system_metrics_interval_s": 0.1,
    })
    with tracking.tracked_run(cfg, "train", "quiet") as run_id:
        time.sleep(0.4)
    assert not [k for k in _client(cfg).get_run(run_id).data.metrics if k.startswith("system/")]


def test_log_figure_in_a_folder_named_by_figure(test_cfg, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = test_cfg.with_overrides({"tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    with tracking.tracked_run(cfg, "sweep", "figs") as run_id:
        fig, ax = plt.subplots()
        ax.plot([0, 1], [1, 0])
        assert tracking.log_figure(cfg.tracking.uri, run_id, fig, "val_r") == "figures/val_r/val_r.png"
        assert tracking.log_figure(cfg.tracking.uri, run_id, fig, "val_r", "sub-01") == "figures/val_r/sub-01.png"
        plt.close(fig)
    arts = [a.path for a in _client(cfg).list_artifacts(run_id, "figures/val_r")]
    assert sorted(arts) == ["figures/val_r/sub-01.png", "figures/val_r/val_r.png"]
