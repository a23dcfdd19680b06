"""Errors, wherever raised (this process, a Ray task, an actor's __init__, a Ray Train worker),
reach the user as one line ``mirage: error: ...`` naming a log file with the full trace."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mirage.cli import main
from mirage.errors import DataError, FeatureStoreError, ModelLoadError
from mirage.failures import PREFIX, error_line

LINE = re.compile(r"^mirage: error: (?P<what>.+) \(full trace: (?P<log>/\S+\.log)\)$")


def _parse(line: str) -> tuple[str, Path]:
    m = LINE.match(line)
    assert m, line
    return m["what"], Path(m["log"])


# ------------------------------------------------------------------ in this process


def test_mirage_error_of_this_process_is_its_message_alone_and_writes_nothing(tmp_path):
    line = error_line(DataError("data.root=/x: no such folder; expected a dataset"), tmp_path / "out")
    assert line == PREFIX + "data.root=/x: no such folder; expected a dataset"
    assert not (tmp_path / "out").exists()


def test_unexpected_error_names_its_type_and_the_log_holding_its_trace(tmp_path):
    def deep():
        raise ValueError("bad value 3\nsecond line")

    try:
        try:
            deep()
        except ValueError as e:
            raise RuntimeError("while loading") from e
    except RuntimeError as e:
        line = error_line(e, tmp_path)
    what, log = _parse(line)
    assert what == "ValueError: bad value 3"
    assert log.parent == tmp_path / "logs" and log.name.startswith("mirage-")
    text = log.read_text()
    assert "Traceback" in text and "in deep" in text and "RuntimeError: while loading" in text


def test_mirage_error_under_a_wrapper_is_found_through_the_cause_chain(tmp_path):
    try:
        try:
            raise FeatureStoreError("store S: no features for 's01e01a'")
        except FeatureStoreError as e:
            raise RuntimeError("worker failed") from e
    except RuntimeError as e:
        what, log = _parse(error_line(e, tmp_path))
    assert what == "store S: no features for 's01e01a'"
    assert "FeatureStoreError" in log.read_text()


def test_cli_prints_one_line_and_debug_adds_the_trace(tmp_path, capfd):
    argv = ["score", str(tmp_path / "missing.npz"), "--set", f"outputs={tmp_path}"]
    assert main(argv) == 1
    assert capfd.readouterr().err.strip().splitlines() == [f"mirage: error: {tmp_path / 'missing.npz'}: predictions file not found"]
    assert main(["--debug", *argv]) == 1
    err = capfd.readouterr().err.strip().splitlines()
    assert err[0].startswith("Traceback") and err[-1].startswith("mirage: error: ")
    assert main([*argv, "--debug"]) == 1  # also after the subcommand (jobs pass their arguments through)
    assert capfd.readouterr().err.startswith("Traceback")


# ------------------------------------------------------------------ from Ray workers


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_error_in_a_ray_train_worker_reaches_the_cli_as_one_line(test_cfg, synth_root, feature_store, tmp_path, capfd):
    """A FeatureStoreError raised inside a Train worker (model.layers beyond the store's layers,
    which only the worker's dataset sees) arrives as ``WorkerGroupError``; the CLI prints its message."""
    from conftest import TEST_OVERRIDES

    import ray

    sets = [*TEST_OVERRIDES, f"outputs={tmp_path}", f"data.root={synth_root}",
            f"features.store={test_cfg.features.store}", "train.use_gpu=false", "train.num_workers=1",
            "train.max_failures=0", "model.layers=[99]", "ray.num_cpus=4", "ray.include_dashboard=false"]
    rc = main(["train", "--no-track", *[x for v in sets for x in ("--set", v)]])
    assert not ray.is_initialized()
    err = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
    assert rc == 1
    what, log = _parse(err[-1])
    assert what.startswith("model.layers=[99]: the feature store holds"), what
    assert log.parent == tmp_path / "logs"
    text = log.read_text()
    assert "WorkerGroupError" in text and "FeatureStoreError" in text
    assert not any("mirage/cli.py" in ln for ln in err)  # no driver traceback (Ray still streams its workers' logs)


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_error_in_a_ray_task_prints_the_mirage_message(local_ray, tmp_path):
    import ray

    @ray.remote
    def task():
        raise FeatureStoreError("feature store K: no features for 'life01'")

    with pytest.raises(Exception) as info:
        ray.get(task.remote())
    assert type(info.value).__name__.startswith("RayTaskError")
    what, log = _parse(error_line(info.value, tmp_path))
    assert what == "feature store K: no features for 'life01'"
    assert "in task" in log.read_text()


@pytest.mark.slow
def test_error_in_an_actor_init_prints_the_mirage_message(local_ray, tmp_path):
    import ray

    @ray.remote
    class Loader:
        def __init__(self):
            raise ModelLoadError("/nonexistent: model directory not found")

        def ping(self):
            return 1

    with pytest.raises(ray.exceptions.RayActorError) as info:
        ray.get(Loader.remote().ping.remote())
    what, _ = _parse(error_line(info.value, tmp_path))
    assert what == "/nonexistent: model directory not found"


@pytest.mark.slow
def test_other_error_in_a_ray_task_prints_the_innermost_type(local_ray, tmp_path):
    import ray

    @ray.remote
    def task():
        return {}["missing"]

    with pytest.raises(Exception) as info:
        ray.get(task.remote())
    what, log = _parse(error_line(info.value, tmp_path))
    assert what == "KeyError: 'missing'"
    assert "return {}[\"missing\"]" in log.read_text()
