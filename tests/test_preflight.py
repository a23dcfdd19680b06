"""Preflight: a command whose inputs are wrong fails in seconds with one line, before Ray starts,
leaving no output folder, no Ray session and no MLflow run."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from mirage.cli import main
from mirage.errors import ResourceError, TrackingError
from mirage.ports import free_port
from mirage.preflight import check_gpus, check_tracking, gpus_needed, local_gpus

FAST_S = 20.0  # a failing preflight answers within this (it is ~1-10 s on a loaded 2-core machine)


def _sets(values: list[str]) -> list[str]:
    return [x for v in values for x in ("--set", v)]


def _run(argv: list[str], capfd) -> tuple[int, list[str], float]:
    """``mirage <argv>`` in this process: exit status, stderr lines, seconds."""
    import ray

    t0 = time.perf_counter()
    rc = main(argv)
    seconds = time.perf_counter() - t0
    err = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
    assert not ray.is_initialized(), "a failing preflight must not start Ray"
    return rc, err, seconds


def _assert_one_line_nothing_left(rc: int, err: list[str], seconds: float, outputs: Path, words: list[str]) -> None:
    assert rc == 1
    assert len(err) == 1 and err[0].startswith("mirage: error: "), err
    for w in words:
        assert w in err[0], err[0]
    assert seconds < FAST_S, f"{seconds:.1f} s"
    # no folder, no Ray storage, no MLflow store (hence no FAILED run), no log
    assert not outputs.exists() or not any(outputs.iterdir()), sorted(outputs.rglob("*"))


@pytest.fixture()
def base_sets(test_cfg, synth_root, tmp_path) -> tuple[list[str], Path]:
    from conftest import TEST_OVERRIDES

    outputs = tmp_path / "outputs"
    return [*TEST_OVERRIDES, f"outputs={outputs}", f"data.root={synth_root}", "train.use_gpu=false"], outputs


# ------------------------------------------------------------------ dataset and features


def test_train_without_feature_store_fails_in_seconds_leaving_nothing(base_sets, tmp_path, capfd):
    sets, outputs = base_sets
    rc, err, s = _run(["train", *_sets([*sets, f"features.store={tmp_path / 'no-store'}"])], capfd)
    _assert_one_line_nothing_left(rc, err, s, outputs, ["no feature store for key", "mirage extract"])


def test_train_on_missing_dataset_names_data_root(base_sets, tmp_path, capfd):
    sets, outputs = base_sets
    rc, err, s = _run(["train", *_sets([*sets, f"data.root={tmp_path / 'nowhere'}"])], capfd)
    _assert_one_line_nothing_left(rc, err, s, outputs, [f"data.root={tmp_path / 'nowhere'}", "Algonauts 2025 layout"])


def test_train_with_subject_absent_from_dataset_names_it(base_sets, capfd):
    sets, outputs = base_sets
    rc, err, s = _run(["train", *_sets([*sets, "data.subjects=[sub-01, sub-09]"])], capfd)
    _assert_one_line_nothing_left(rc, err, s, outputs, ["sub-09", "data.subjects"])


def _store_copy(feature_store, tmp_path: Path) -> Path:
    """A copy of the session store at <tmp>/stores/<key>; returns the store root folder (features.store)."""
    root = tmp_path / "stores"
    shutil.copytree(feature_store.root, root / feature_store.root.name)
    return root


def test_store_written_with_other_parameters_is_refused(base_sets, feature_store, tmp_path, capfd):
    sets, outputs = base_sets
    root = _store_copy(feature_store, tmp_path)
    manifest = root / feature_store.root.name / "manifest.json"
    m = json.loads(manifest.read_text())
    m["params"]["max_words"] = int(m["params"].get("max_words", 0)) + 1
    manifest.write_text(json.dumps(m))
    rc, err, s = _run(["train", *_sets([*sets, f"features.store={root}"])], capfd)
    _assert_one_line_nothing_left(rc, err, s, outputs, ["other extraction parameters", "max_words"])


def test_store_missing_a_training_stimulus_is_refused(base_sets, feature_store, tmp_path, capfd):
    sets, outputs = base_sets
    root = _store_copy(feature_store, tmp_path)
    gone = "s06e01a"
    assert feature_store.has(gone)
    (root / feature_store.root.name / f"{gone}.npy").unlink()
    rc, err, s = _run(["train", *_sets([*sets, f"features.store={root}"])], capfd)
    _assert_one_line_nothing_left(rc, err, s, outputs, ["no features for 1 of", gone])


def test_complete_store_passes_preflight(test_cfg, synth_root, feature_store):
    from mirage.preflight import preflight

    cfg = test_cfg.with_overrides({"data.root": str(synth_root), "train.use_gpu": False})
    preflight(cfg, {"data", "features", "gpus", "tracking"})


def test_extraction_preflight_needs_no_training_runs(test_cfg, synth_root):
    from mirage.preflight import preflight

    cfg = test_cfg.with_overrides({"data.root": str(synth_root), "data.val": ["friends:s99"]})
    preflight(cfg, {"data"}, splits=())
    with pytest.raises(Exception, match="no fMRI run in the val split"):
        preflight(cfg, {"data"})


# ------------------------------------------------------------------ model URI


@pytest.mark.parametrize("command", ["predict", "serve"])
def test_bogus_local_model_fails_before_ray(command, base_sets, tmp_path, capfd):
    sets, outputs = base_sets
    extra = ["--split", "val", "--out", str(tmp_path / "pred")] if command == "predict" else []
    rc, err, s = _run([command, "--model", str(tmp_path / "nonexistent"), *extra, *_sets(sets)], capfd)
    _assert_one_line_nothing_left(rc, err, s, outputs, [f"{tmp_path / 'nonexistent'}: model directory not found"])
    assert not (tmp_path / "pred").exists()


def test_registry_uri_without_mlflow_store_fails_without_creating_one(base_sets, capfd):
    sets, outputs = base_sets
    rc, err, s = _run(["serve", "--model", "models:/mirage@champion", *_sets(sets)], capfd)
    _assert_one_line_nothing_left(rc, err, s, outputs, ["models:/mirage@champion", "no MLflow store"])


def test_unknown_registered_model_and_run_are_refused(test_cfg, tmp_path):
    from mirage import tracking
    from mirage.errors import ModelLoadError
    from mirage.pipeline.predict import check_model

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = test_cfg.with_overrides({"tracking.uri": uri})
    c = tracking.client(uri)
    exp = c.create_experiment("e", artifact_location=str(tmp_path / "art"))
    run = c.create_run(exp)
    with pytest.raises(ModelLoadError, match="models:/nope@champion: not found in MLflow"):
        check_model(cfg, "models:/nope@champion")
    with pytest.raises(ModelLoadError, match="runs:/0123abcd/model: not found in MLflow"):
        check_model(cfg, "runs:/0123abcd/model")
    with pytest.raises(ModelLoadError, match="has no artifact 'model'"):
        check_model(cfg, f"runs:/{run.info.run_id}/model")
    with pytest.raises(ModelLoadError, match="expected models:/<name>@<alias>"):
        check_model(cfg, "models:/mirage")


@pytest.mark.parametrize("command", ["predict", "serve"])
def test_unknown_registered_model_fails_before_ray(command, base_sets, tmp_path, capfd):
    """The store exists, the model is not in it: one line naming the URI, and no Ray session."""
    from mirage import tracking

    sets, _ = base_sets
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.client(uri).create_experiment("e", artifact_location=str(tmp_path / "art"))
    capfd.readouterr()  # MLflow's own lines on creating the store
    extra = ["--split", "val", "--out", str(tmp_path / "pred")] if command == "predict" else []
    rc, err, _ = _run([command, "--model", "models:/nope@champion", *extra, *_sets([*sets, f"tracking.uri={uri}"])],
                      capfd)
    assert rc == 1 and len(err) == 1, err
    assert err[0].startswith("mirage: error: models:/nope@champion: not found in MLflow"), err[0]
    assert not (tmp_path / "pred").exists()


def test_exported_model_directory_passes(tmp_path):
    from mirage.errors import ModelLoadError
    from mirage.model_dirs import EXPORT_FILES
    from mirage.preflight import check_model

    d = tmp_path / "model"
    d.mkdir()
    (d / "model.safetensors").write_text("x")
    with pytest.raises(ModelLoadError, match="not a model directory"):
        check_model(str(d), "")
    for f in EXPORT_FILES:
        (d / f).write_text("x")
    check_model(f"file://{d}", "")


# ------------------------------------------------------------------ GPUs


def test_gpu_request_beyond_this_machine_fails_in_seconds(base_sets, capfd):
    sets, outputs = base_sets
    want = local_gpus() + 1
    rc, err, s = _run(["train", *_sets([*sets, "train.use_gpu=true", f"train.num_workers={want}"])], capfd)
    _assert_one_line_nothing_left(rc, err, s, outputs, [f"asks for {want} GPUs", f"this machine has {want - 1}"])


def test_gpu_requests_of_each_job(test_cfg):
    cfg = test_cfg.with_overrides({
        "train.use_gpu": True, "train.num_workers": 3, "features.actors": 2, "features.gpus_per_actor": 0.5,
        "serve.replicas": 2, "serve.gpus_per_replica": 0.25, "serve.predict_actors": 3,
    })
    assert [gpus_needed(cfg, u) for u in ("train", "extract", "serve", "predict")] == [3, 1.0, 0.5, 0.75]
    check_gpus(cfg, "serve", present=0.5)
    with pytest.raises(ResourceError, match=r"serve.predict_actors x serve.gpus_per_replica asks for 0.75 GPUs, but the Ray cluster has 0.5"):
        check_gpus(cfg, "predict", present=0.5, where="the Ray cluster")
    assert gpus_needed(cfg.with_overrides({"train.use_gpu": False}), "train") == 0


def test_gpu_check_waits_for_the_cluster_when_one_is_named(test_cfg, monkeypatch):
    cfg = test_cfg.with_overrides({"train.use_gpu": True, "train.num_workers": 64})
    with pytest.raises(ResourceError):
        check_gpus(cfg, "train")
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    check_gpus(cfg, "train")  # not knowable before connecting: checked after init_ray
    with pytest.raises(ResourceError, match="the Ray cluster has 8"):
        check_gpus(cfg, "train", present=8, where="the Ray cluster")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_training_on_a_ray_without_enough_gpus_fails_fast_instead_of_waiting(test_cfg, tmp_path):
    """After connecting (a local Ray here, a cluster in production) the GPU request is checked
    against what Ray can ever provide; without the check Ray Train waits for the GPUs forever."""
    import ray

    from mirage.distributed.train import run_training

    want = local_gpus() + 1
    cfg = test_cfg.with_overrides({
        "train.use_gpu": True, "train.num_workers": want,
        "train.storage": str(tmp_path / "ray_results"), "ray.num_cpus": 4, "ray.include_dashboard": False,
    })
    t0 = time.perf_counter()
    try:
        with pytest.raises(ResourceError, match=f"asks for {want} GPUs, but the Ray cluster has {want - 1}"):
            run_training(cfg, track=False)
    finally:
        ray.shutdown()
    assert time.perf_counter() - t0 < 90
    assert not (tmp_path / "ray_results").exists()


# ------------------------------------------------------------------ MLflow


def test_unreachable_tracking_server_fails_in_seconds(base_sets, capfd):
    sets, outputs = base_sets
    rc, err, s = _run(["train", *_sets([*sets, "tracking.uri=http://127.0.0.1:9"])], capfd)
    _assert_one_line_nothing_left(rc, err, s, outputs, ["tracking.uri=http://127.0.0.1:9", "not reachable"])


def test_tracking_store_under_a_file_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(TrackingError, match="not a writable folder"):
        check_tracking(f"sqlite:///{blocker / 'sub' / 'mlflow.db'}")
    check_tracking(f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}")
    assert not (tmp_path / "new").exists()


def test_no_track_skips_the_tracking_check(base_sets, tmp_path, capfd):
    sets, outputs = base_sets
    rc, err, _ = _run(["train", "--no-track", *_sets([*sets, "tracking.uri=http://127.0.0.1:9",
                                                      f"features.store={tmp_path / 'no-store'}"])], capfd)
    assert rc == 1 and "no feature store" in err[-1]



@pytest.mark.slow
@pytest.mark.timeout(180)
def test_tracking_check_passes_on_a_live_mlflow_server_and_fails_once_it_stops(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    mlflow = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--default-artifact-root", str(tmp_path / "art")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 150
        while True:
            try:
                check_tracking(uri, timeout_s=2)
                break
            except TrackingError:
                assert proc.poll() is None and time.monotonic() < deadline, "mlflow server did not come up"
                time.sleep(1)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its workers: their own process group
        proc.wait(timeout=30)
    t0 = time.perf_counter()
    with pytest.raises(TrackingError, match=f"tracking.uri={uri}: MLflow server not reachable"):
        check_tracking(uri)
    assert time.perf_counter() - t0 < 10
