"""Ray Train end to end on CPU workers: FSDP2 equivalence, worker loss, full restart, MLflow record."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from mirage.distributed.train import MLFLOW_RUN_FILE, run_training
from run_helpers import in_thread

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def ray_local(train_cfg):
    import ray

    from mirage.distributed.cluster import init_ray

    init_ray(train_cfg.ray)
    try:
        yield
    finally:
        ray.shutdown()


def _kill_a_worker_after(run_dir: Path, epoch_dir: str, timeout: float = 240) -> int:
    """Wait until ``run_dir/epoch_dir`` is persisted, then SIGKILL one Ray Train worker process."""
    from ray.util.state import list_actors

    deadline = time.time() + timeout
    while not (run_dir / epoch_dir).is_dir():
        if time.time() > deadline:
            raise TimeoutError(f"{run_dir / epoch_dir} never appeared")
        time.sleep(0.2)
    import ray

    workers = list_actors(
        address=ray.get_runtime_context().gcs_address,  # this test's Ray, not another one on the machine
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
    )
    workers = [a for a in workers if a.pid]
    assert workers, "no live Ray Train worker to kill"
    pid = workers[-1].pid
    os.kill(pid, signal.SIGKILL)
    return pid


def test_killed_worker_resumes_from_last_checkpoint(train_cfg, ray_local, tmp_path):
    cfg = train_cfg.with_overrides(
        {"train.epochs": 5, "train.num_workers": 2, "train.max_failures": 1, "train.storage": str(tmp_path)}
    )
    thread, out = in_thread(lambda: run_training(cfg, name="killed", track=False))
    _kill_a_worker_after(tmp_path / "killed", "epoch_0001")
    thread.join(timeout=400)
    assert not thread.is_alive(), "training did not finish after the worker was killed"
    assert "error" not in out, out.get("error")
    res = out["result"]
    assert [h["epoch"] for h in res.history] == list(range(5))  # every epoch once, none lost or doubled
    resumed_at = max(h["start_epoch"] for h in res.history)
    assert resumed_at >= 1  # the replacement workers continued from a checkpoint, not from scratch
    assert res.model_dir and Path(res.model_dir, "model.safetensors").is_file()
    from mirage.distributed.train import latest_complete_checkpoint
    from mirage.train.loop import is_complete

    last = tmp_path / "killed" / "epoch_0004"
    assert is_complete(last), "rank 0 marks a persisted checkpoint complete after every rank reported"
    assert latest_complete_checkpoint(tmp_path / "killed") == last


def test_restarted_run_resumes_and_is_tracked(train_cfg, ray_local, tmp_path):
    """A run that fails (no retries left) is FAILED in MLflow; rebuilding it with the same name resumes it."""
    from mlflow import MlflowClient

    cfg = train_cfg.with_overrides(
        {
            "train.epochs": 4,
            "train.num_workers": 1,
            "train.max_failures": 0,
            "train.storage": str(tmp_path / "ray"),
            "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "tracking.experiment": "restart-test",
        }
    )
    thread, out = in_thread(lambda: run_training(cfg, name="restart"))
    _kill_a_worker_after(tmp_path / "ray" / "restart", "epoch_0001")
    thread.join(timeout=300)
    assert "error" in out, "a run without retries should fail when a worker dies"
    import json

    run_id = json.loads((tmp_path / "ray" / "restart" / MLFLOW_RUN_FILE).read_text())["run_id"]
    client = MlflowClient(tracking_uri=cfg.tracking.uri, registry_uri=cfg.tracking.uri)
    assert client.get_run(run_id).info.status == "FAILED"

    res = run_training(cfg, name="restart")  # a full restart: new trainer, same storage path and name
    assert res.mlflow_run_id == run_id  # the same MLflow run continues
    assert [h["epoch"] for h in res.history] == list(range(4))
    assert res.history[0]["start_epoch"] == 0  # epoch 0 was checkpointed before the failure ...
    assert res.history[-1]["start_epoch"] >= 1  # ... and the restart continued after it

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["mirage.kind"] == "train"
    assert tags["mirage.feature_key"].startswith("tiny-")
    assert tags["mirage.data_root"] == cfg.data.root
    assert tags["mirage.code_version"]
    flat = cfg.flat()
    assert run.data.params["model.n_queries"] == str(flat["model.n_queries"])
    assert run.data.params["train.lr"] == str(flat["train.lr"])
    assert len(run.data.params) == len(flat)
    for key in ("train_loss", "val_r", "val_r_pooled", "val_r_per_subject", "val_r/sub-01", "val_r/sub-05"):
        steps = {m.step for m in client.get_metric_history(run_id, key)}
        assert steps == set(range(4)), (key, steps)
    assert run.data.metrics["best_val_r"] == pytest.approx(res.best_val_r)
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "validation"} <= top
    from mirage.model_dirs import find_model_dir
    from mirage.tracking import download_run_artifacts

    model = download_run_artifacts(cfg.tracking.uri, run_id, "model", tmp_path / "model")  # the run's MLflow model
    assert (model / "MLmodel").is_file()
    assert {p.name for p in find_model_dir(model).iterdir()} >= {"model.safetensors", "config.yaml", "meta.json"}
    local = client.download_artifacts(run_id, "validation/val_r.npy", str(tmp_path / "dl"))
    assert np.load(local).shape == (len(cfg.data.subjects), cfg.data.n_parcels)
