"""How a trial trains: in the Tune trial process (``direct``) or through a ``TorchTrainer`` (``trainer``).

Two one-trial sweeps on the same tiny config, one per runner, on a real local Ray and a real
MLflow store: the direct trial starts no Ray Train controller yet leaves the same MLflow run
(tags, parent, per-epoch metrics, artifacts) and the same checkpoint layout. A direct trial whose
process is killed after its first checkpoint resumes from it into the same MLflow run.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from run_helpers import mlflow_client, run_artifacts

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

EPOCHS = 2


def _actors(class_name: str) -> list:
    import ray
    from ray.util.state import list_actors

    return list_actors(
        address=ray.get_runtime_context().gcs_address,
        filters=[("class_name", "=", class_name)],
        limit=10_000,
    )


def _logged_model_files(uri: str, run_id: str, dest: Path) -> set[str]:
    """Files of the exported model inside the run's MLflow model ``runs:/<run_id>/model``."""
    from mirage.model_dirs import find_model_dir
    from mirage.tracking import download_run_artifacts

    model = download_run_artifacts(uri, run_id, "model", dest)
    assert (model / "MLmodel").is_file(), f"run {run_id} logged no MLflow model"
    return {p.name for p in find_model_dir(model).iterdir()}


@pytest.fixture(scope="module")
def runs(train_cfg, tmp_path_factory):
    import ray
    from mirage.distributed.cluster import init_ray
    from mirage.distributed.sweep import run_sweep

    work = tmp_path_factory.mktemp("sweep_runner")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    base = {
        "tracking.uri": uri, "train.storage": str(work / "ray"), "train.epochs": EPOCHS,
        "sweep.num_samples": 1, "sweep.max_concurrent": 1, "sweep.n_startup_trials": 1,
        "sweep.space": {"model.depth": {"kind": "choice", "values": [1]}},
    }
    out = {"uri": uri, "work": work}
    init_ray(train_cfg.ray)
    try:
        for runner in ("direct", "trainer"):
            cfg = train_cfg.with_overrides({**base, "sweep.name": f"runner-{runner}", "sweep.trial_runner": runner})
            res = run_sweep(cfg)
            out[runner] = {"res": res, "cfg": cfg, "controllers": len(_actors("TrainController"))}
    finally:
        ray.shutdown()
    return out


def test_direct_trial_starts_no_train_controller(runs):
    assert runs["direct"]["controllers"] == 0, "a direct trial started a Ray Train controller"
    assert runs["trainer"]["controllers"] >= 1, "the trainer trial should have started one (the check could not fail)"
    for runner in ("direct", "trainer"):
        (t,) = runs[runner]["res"].trials
        assert t.status == "TERMINATED" and t.epochs == EPOCHS and t.best is not None, (runner, t)


def test_direct_and_trainer_trials_leave_the_same_mlflow_run(runs, tmp_path):
    c = mlflow_client(runs["uri"])
    got = {}
    for runner in ("direct", "trainer"):
        res = runs[runner]["res"]
        (t,) = res.trials
        run = c.get_run(t.run_id)
        assert run.info.status == "FINISHED", (runner, run.info.status)
        tags = run.data.tags
        assert tags["mirage.kind"] == "trial" and tags["mirage.trial_id"] == t.trial_id
        assert tags["mirage.sweep"] == f"runner-{runner}" and tags["mlflow.parentRunId"] == res.parent_run_id
        steps = sorted(m.step for m in c.get_metric_history(t.run_id, "val_r"))
        assert steps == list(range(EPOCHS)), (runner, steps)
        got[runner] = {
            "metrics": {m for m in run.data.metrics if not m.startswith("system/")},  # sampled every 10 s: by duration
            "params": set(run.data.params),
            "artifacts": run_artifacts(c, t.run_id),
        }
        files = _logged_model_files(runs["uri"], t.run_id, tmp_path / runner)
        assert {"model.safetensors", "config.yaml", "meta.json"} <= files, (runner, files)
        assert any(a.startswith("validation/") for a in got[runner]["artifacts"]), got[runner]["artifacts"]
    for key in ("metrics", "params", "artifacts"):
        d, t = got["direct"][key], got["trainer"][key]
        assert d == t, f"{key}: only direct {sorted(d - t)}, only trainer {sorted(t - d)}"


def test_direct_trial_keeps_the_trainer_checkpoint_layout(runs):
    from mirage.distributed.sweep import trial_train_name
    from mirage.train.loop import MODEL_DIR, is_complete

    for runner in ("direct", "trainer"):
        cfg, (t,) = runs[runner]["cfg"], runs[runner]["res"].trials
        run_dir = Path(cfg.train.storage) / trial_train_name(cfg.sweep.name, t.trial_id)
        epochs = sorted(p.name for p in run_dir.glob("epoch_*"))
        assert epochs and epochs[-1] == f"epoch_{EPOCHS - 1:04d}" and len(epochs) <= 2, (runner, epochs)
        assert all(is_complete(run_dir / e) for e in epochs)
        assert any((run_dir / e / MODEL_DIR).is_dir() for e in epochs)
        saved = json.loads((run_dir / "mlflow_run.json").read_text())
        assert saved["run_id"] == t.run_id


def test_killed_direct_trial_resumes_from_its_checkpoint(train_cfg, tmp_path):
    import ray
    from mirage.distributed.cluster import init_ray
    from mirage.distributed.train import MLFLOW_RUN_FILE, run_in_trial
    from ray import tune

    epochs = 4
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = train_cfg.with_overrides({"tracking.uri": uri, "train.storage": str(tmp_path / "ray"), "train.epochs": epochs})
    run_dir = Path(cfg.train.storage) / "resume-trial"
    base = cfg.to_dict()
    pid_file = tmp_path / "trial.pid"

    def trial(params):
        from mirage.config import Config

        if not pid_file.exists():  # the first attempt's process
            pid_file.write_text(str(os.getpid()))
        run_in_trial(Config.model_validate(base), name="resume-trial", tags={"mirage.trial_id": "t"})

    killed = {}

    def kill_after_first_checkpoint():
        deadline = time.time() + 300
        while not (run_dir / "epoch_0000" / "COMPLETE").is_file() and time.time() < deadline:
            time.sleep(0.05)
        killed["run_id"] = json.loads((run_dir / MLFLOW_RUN_FILE).read_text())["run_id"]
        if pid_file.is_file():
            killed["pid"] = int(pid_file.read_text())
            os.kill(killed["pid"], signal.SIGKILL)
            time.sleep(0.5)
            killed["epochs_done"] = sorted(p.parent.name for p in run_dir.glob("epoch_*/COMPLETE"))

    init_ray(cfg.ray)
    try:
        watcher = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
        watcher.start()
        tuner = tune.Tuner(
            tune.with_resources(trial, {"cpu": 1}),
            run_config=tune.RunConfig(
                name="resume", storage_path=str(tmp_path / "tune"), failure_config=tune.FailureConfig(max_failures=1)
            ),
        )
        grid = tuner.fit()
        watcher.join(timeout=60)
    finally:
        ray.shutdown()
    assert killed.get("pid"), f"the trial was never killed: {killed}"
    assert len(killed["epochs_done"]) < epochs, f"killed too late to test a resume: {killed}"
    (result,) = list(grid)
    assert result.error is None, result.error
    rows = [json.loads(line) for line in Path(result.path, "result.json").read_text().splitlines()]
    epochs_seen = [r["epoch"] for r in rows]
    assert epochs_seen[-1] == epochs - 1
    restarted = [r for r in rows if r["start_epoch"] > 0]
    assert restarted, f"no report came from a resumed attempt: {epochs_seen}"
    first_resumed = restarted[0]["start_epoch"]
    assert first_resumed == int(killed["epochs_done"][-1][len("epoch_"):]) + 1  # from the last complete checkpoint
    assert [r["epoch"] for r in restarted] == list(range(first_resumed, epochs))  # no epoch trained twice after it
    c = mlflow_client(uri)
    run = c.get_run(killed["run_id"])  # the same MLflow run, reopened and closed
    assert run.info.status == "FINISHED"
    assert {m.step for m in c.get_metric_history(killed["run_id"], "val_r")} == set(range(epochs))
    assert "model.safetensors" in _logged_model_files(uri, killed["run_id"], tmp_path / "model")
