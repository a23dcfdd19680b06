"""MLflow glue: experiment created once, platform tags and params, true end status of every run."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from mirage import tracking


@pytest.fixture
def track_cfg(test_cfg, tmp_path):
    return test_cfg.with_overrides(
        {"tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "tracking.experiment": "tracking-test"}
    )


def test_run_records_tags_params_config_and_metrics(track_cfg, tmp_path):
    with tracking.tracked_run(track_cfg, "train", "unit", tags={"extra": "x"}) as run_id:
        tracking.EpochLogger(track_cfg.tracking.uri, run_id)(
            {"epoch": 0, "train_loss": 1.5, "val_r": 0.2, "val_r/sub-01": 0.3, "is_best": 1}
        )
        tracking.EpochLogger(track_cfg.tracking.uri, run_id)({"epoch": 0, "val_r": 99.0}, rank=1)  # not rank 0
    c = MlflowClient(tracking_uri=track_cfg.tracking.uri, registry_uri=track_cfg.tracking.uri)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mirage.kind"] == "train" and run.data.tags["extra"] == "x"
    assert run.data.tags["mirage.data_root"] == track_cfg.data.root
    assert run.data.tags["mirage.code_version"] and run.data.tags["mirage.feature_key"]
    assert run.data.params == {k: str(v) for k, v in track_cfg.flat().items()}
    assert run.data.metrics == {"train_loss": 1.5, "val_r": 0.2, "val_r/sub-01": 0.3}
    assert [a.path for a in c.list_artifacts(run_id)] == ["config.yaml"]
    exp = c.get_experiment(run.info.experiment_id)
    assert exp.name == "tracking-test" and exp.artifact_location.startswith(str(tmp_path))
    assert tracking.ensure_experiment(track_cfg.tracking) == run.info.experiment_id  # created once


@pytest.mark.parametrize("exc, status", [(RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")])
def test_run_ends_with_its_true_status(track_cfg, exc, status):
    seen = {}
    with pytest.raises(type(exc)):
        with tracking.tracked_run(track_cfg, "baseline", "fails") as run_id:
            seen["id"] = run_id
            raise exc
    assert MlflowClient(tracking_uri=track_cfg.tracking.uri, registry_uri=track_cfg.tracking.uri).get_run(seen["id"]).info.status == status


def test_nested_run_and_reopen(track_cfg):
    with tracking.tracked_run(track_cfg, "sweep", "parent") as parent:
        with tracking.tracked_run(track_cfg, "trial", "child", parent_run_id=parent) as child:
            pass
    c = MlflowClient(tracking_uri=track_cfg.tracking.uri, registry_uri=track_cfg.tracking.uri)
    assert c.get_run(child).data.tags["mlflow.parentRunId"] == parent
    assert not tracking.reopen_run(track_cfg.tracking.uri, child)  # finished runs are not reopened
    with pytest.raises(RuntimeError):
        with tracking.tracked_run(track_cfg, "train", "t") as failed:
            raise RuntimeError
    with tracking.tracked_run(track_cfg, "train", "t", run_id=failed) as again:
        assert again == failed
    assert c.get_run(failed).info.status == "FINISHED"


def test_relative_sqlite_uri_is_refused(track_cfg):
    from mirage.config import ConfigError

    with pytest.raises(ConfigError, match="absolute"):
        tracking.client("sqlite:///mlflow.db")
    with pytest.raises(ValueError, match="mirage.kind"):
        tracking.run_tags(track_cfg, "nonsense")
