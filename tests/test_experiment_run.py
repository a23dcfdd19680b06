"""A declared experiment end to end on the tiny synthetic dataset, real Ray Tune and a real MLflow store.

Two trials (MIRAGE and the native-fusion linear baseline, each a Tune trial) under one parent run;
the report's table and figures land in MLflow; ``mirage experiment report`` in a fresh process
recomputes the same table from MLflow alone; rerunning the finished experiment trains nothing.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TEST_OVERRIDES
from run_helpers import mlflow_client, run_artifacts

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[1]
SPEC = {
    "name": "exp-e2e",
    "methods": {"mirage": {}, "linear": {"kind": "baseline", "baseline": "native_linear"}},
    "seeds": [0],
    "splits": ["val", "ood"],
    "base": {"train.epochs": 2},
    "report": {"figures": ["bars", "maps", "networks", "difference", "timecourses", "probes", "attention"],
               "compare": ["mirage", "linear"]},
}


def _table(client, run_id: str, dest: Path) -> list[dict]:
    p = client.download_artifacts(run_id, "experiment/table.csv", str(dest))
    return list(csv.DictReader(io.StringIO(Path(p).read_text())))


@pytest.fixture(scope="module")
def done(train_cfg, tmp_path_factory):
    import ray
    from mirage.distributed.cluster import init_ray
    from mirage.experiments.spec import load_spec
    from mirage.pipeline.experiment import run_experiment

    work = tmp_path_factory.mktemp("experiment")
    spec_file = work / "exp.yaml"
    spec_file.write_text(yaml.safe_dump(SPEC, sort_keys=False))
    uri = f"sqlite:///{work / 'mlflow.db'}"
    cfg = train_cfg.with_overrides({"tracking.uri": uri, "train.storage": str(work / "ray")})
    spec = load_spec(str(spec_file))
    init_ray(cfg.ray)
    try:
        first = run_experiment(cfg, spec)
    finally:
        ray.shutdown()
    return {"cfg": cfg, "spec": spec, "spec_file": spec_file, "uri": uri, "work": work, "first": first}


def test_every_trial_is_a_finished_child_of_one_parent(done):
    c = mlflow_client(done["uri"])
    parent = c.get_run(done["first"].parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["mirage.kind"] == "experiment"
    kids = c.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.data.tags["mirage.experiment_trial"] for r in kids) == ["linear", "mirage|seed=0"]
    assert sorted(r.data.tags["mirage.kind"] for r in kids) == ["baseline", "trial"]
    for r in kids:
        assert r.info.status == "FINISHED" and r.data.tags["mirage.experiment_scored"] == "1"
        assert r.data.tags["mirage.splits_missing"] == "ood", "the synthetic dataset holds no OOD fMRI"
        assert "r_val" in r.data.metrics and "table/val/mean_r" in r.data.metrics, "the UI compares children on these"
        assert "experiment/scores.npz" in run_artifacts(c, r.info.run_id)


def test_table_and_figures_are_in_mlflow(done):
    c = mlflow_client(done["uri"])
    run_id = done["first"].parent_run_id
    arts = run_artifacts(c, run_id)
    assert {"experiment/table.csv", "experiment/table.json", "experiment/networks.csv", "experiment/probes.csv",
            "experiment/attention.csv", "figures/attention/mirage.png",
            "figures/bars/val.png", "figures/networks/val.png", "figures/probes/val.png"} <= arts
    assert any(a.startswith("figures/maps/mirage_") for a in arts), sorted(arts)
    assert any(a.startswith("figures/difference/mirage_minus_linear") for a in arts), sorted(arts)
    assert any(a.startswith("figures/timecourses/mirage_sub-01") for a in arts), sorted(arts)
    rows = _table(c, run_id, done["work"] / "t0")
    assert [(r["row"], r["split"]) for r in rows] == [("mirage", "val"), ("linear", "val")]
    by = {r["row"]: r for r in rows}
    # planted signal: the baseline and the trained model both find it; the ceiling normalises r upwards
    assert float(by["linear"]["mean_r"]) > 0.1, by["linear"]
    assert float(by["mirage"]["mean_r"]) > 0.05, by["mirage"]
    for r in rows:
        assert float(r["mean_r_norm"]) > float(r["mean_r"]) and int(r["n_subjects"]) == 4


def test_report_in_a_fresh_process_recomputes_the_same_table(done):
    c = mlflow_client(done["uri"])
    run_id = done["first"].parent_run_id
    before = _table(c, run_id, done["work"] / "t1")
    sets = TEST_OVERRIDES + [f"tracking.uri={done['uri']}", f"outputs={done['work'] / 'fresh'}"]
    cmd = [sys.executable, "-m", "mirage", "experiment", "report", str(done["spec_file"]), "--config", "demo"]
    cmd += [a for s in sets for a in ("--set", s)]
    p = subprocess.run(cmd, cwd=done["work"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert p.returncode == 0, p.stdout + p.stderr
    assert "mean r" in p.stdout and "linear" in p.stdout
    after = _table(c, run_id, done["work"] / "t2")
    assert after == before
    table = json.loads(Path(c.download_artifacts(run_id, "experiment/table.json", str(done["work"] / "t3"))).read_text())
    assert len(table["data"]) == len(before), "a second report must replace the MLflow table, not append to it"


def test_rerunning_a_finished_experiment_trains_nothing(done):
    import ray
    from mirage.pipeline.experiment import run_experiment

    c = mlflow_client(done["uri"])
    parent = done["first"].parent_run_id
    n_before = len(c.search_runs([c.get_run(parent).info.experiment_id]))
    again = run_experiment(done["cfg"], done["spec"])
    assert again.parent_run_id == parent
    assert again.grid.trained == [] and sorted(again.grid.skipped) == ["linear", "mirage|seed=0"]
    assert not ray.is_initialized(), "nothing left to train must not even start Ray"
    assert len(c.search_runs([c.get_run(parent).info.experiment_id])) == n_before
