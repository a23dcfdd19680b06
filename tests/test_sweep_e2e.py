"""The main job end to end: an interrupted sweep resumes, then the ensemble is registered.

``jobs/sweep.py`` runs twice as a user would run it (a subprocess, from another working
directory): the first run gets Ctrl-C (SIGINT) once a trial has finished; the second run, the
same command, resumes the Tune state and goes on to the ensemble. Real Ray, real MLflow (sqlite).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TEST_OVERRIDES
from ray.tune import ExperimentAnalysis

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
N_TRIALS = 4  # two rounds of two: trials without a Train start-up take seconds, the interruption must find one running
REGISTRY = "mirage-e2e"


def _client(uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _runs(uri):
    c = _client(uri)
    exps = [e.experiment_id for e in c.search_experiments()]
    return c.search_runs(exps, max_results=1000) if exps else []


def _trial_runs(uri, status=None):
    return [
        r for r in _runs(uri)
        if r.data.tags.get("mirage.kind") == "trial" and (status is None or r.info.status == status)
    ]


@pytest.fixture(scope="module")
def job(test_cfg, feature_store, tmp_path_factory):
    work = tmp_path_factory.mktemp("sweep_e2e")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    sets = TEST_OVERRIDES + [
        f"outputs={work / 'out'}",
        f"data.root={test_cfg.data.root}",
        f"features.store={test_cfg.features.store}",
        f"tracking.uri={uri}",
        "sweep.name=e2e-sweep",
        f"sweep.num_samples={N_TRIALS}",
        "sweep.max_concurrent=2",
        "sweep.n_startup_trials=2",
        "sweep.grace_period=1",
        "sweep.reduction_factor=2",
        "train.epochs=2",
        "ensemble.n_members=2",
        "ensemble.top_k=2",
        f"ensemble.registry_name={REGISTRY}",
    ]
    cmd = [sys.executable, str(ROOT / "jobs" / "sweep.py"), "--config", "demo"] + [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    cwd = work  # not the project: every path must be absolute

    # 1) interrupted once a trial has finished
    log1 = open(work / "first.log", "w")
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log1, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 900
    finished = []
    while time.time() < deadline and p.poll() is None:
        time.sleep(2)
        # the job creates the store's tables before Tune's folder appears; reading the store
        # earlier would race its schema migration
        if (work / "out" / "ray_results" / "e2e-sweep").is_dir():
            finished = _trial_runs(uri, "FINISHED")
            if finished:
                time.sleep(2)  # let Tune record the trial as done too
                p.send_signal(signal.SIGINT)
                break
    try:
        rc1 = p.wait(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        raise
    exp = work / "out" / "ray_results" / "e2e-sweep"
    done = {t.trial_id for t in ExperimentAnalysis(str(exp)).trials if t.status == "TERMINATED"}
    first = {
        "rc": rc1,
        "done": {tid: _progress_rows(exp, tid) for tid in done},
        "finished": {r.data.tags["mirage.trial_id"]: r.info.end_time for r in _trial_runs(uri, "FINISHED")},
        "trials": {r.data.tags["mirage.trial_id"] for r in _trial_runs(uri)},
        "log": (work / "first.log").read_text(),
    }
    # 2) the same command resumes and completes
    second = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    # 3) the finished sweep's name with another config is refused, not answered with the old result
    changed = cmd + ["--set", "train.epochs=3"]
    third = subprocess.run(changed, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    return {"work": work, "uri": uri, "first": first, "second": second, "third": third, "cfg": test_cfg, "exp": exp}


def _progress_rows(exp: Path, trial_id: str) -> int:
    """Results Tune recorded for a trial (lines of its result.json)."""
    (d,) = [p for p in exp.iterdir() if p.is_dir() and trial_id in p.name]
    return len((d / "result.json").read_text().splitlines())


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(job):
    first, second, uri = job["first"], job["second"], job["uri"]
    assert first["finished"], "no trial finished before the interruption:\n" + first["log"][-3000:]
    assert first["rc"] == 130, first["log"][-3000:]
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    runs = _runs(uri)
    sweeps = [r for r in runs if r.data.tags.get("mirage.kind") == "sweep"]
    assert len(sweeps) == 1, "the resumed sweep must keep its parent run"
    trial_ids = {r.data.tags["mirage.trial_id"] for r in _trial_runs(uri)}
    assert len(trial_ids) == N_TRIALS, f"resuming started new trials: {trial_ids} (first run had {first['trials']})"
    assert first["trials"] <= trial_ids
    assert first["done"], "Tune saved no finished trial before the interruption"
    for tid, rows in first["done"].items():  # finished in Tune's saved state: never rerun
        mine = [r for r in _trial_runs(uri) if r.data.tags["mirage.trial_id"] == tid]
        assert len(mine) == 1 and mine[0].info.status in ("FINISHED", "KILLED"), [r.info.status for r in mine]
        assert _progress_rows(job["exp"], tid) == rows, f"finished trial {tid} was run again"
        if tid in first["finished"]:
            assert mine[0].info.end_time == first["finished"][tid]


def test_mlflow_holds_sweep_trials_and_registered_ensemble(job):
    uri = job["uri"]
    assert job["second"].returncode == 0, job["second"].stderr[-3000:]
    runs = _runs(uri)
    assert all(r.info.status in ("FINISHED", "FAILED", "KILLED") for r in runs), [
        (r.info.run_name, r.info.status) for r in runs
    ]
    sweep = next(r for r in runs if r.data.tags.get("mirage.kind") == "sweep")
    assert sweep.info.status == "FINISHED"
    trials = [r for r in runs if r.data.tags.get("mirage.kind") == "trial"]
    assert trials and all(r.data.tags["mlflow.parentRunId"] == sweep.info.run_id for r in trials)
    for r in trials:  # params and per-epoch metrics under the names of single training runs
        assert r.data.params["model.depth"] and "val_r" in r.data.metrics and "val_r/sub-01" in r.data.metrics
        assert r.data.tags.get("mirage.code_version") and r.data.tags.get("mirage.feature_key")
    c = _client(uri)
    assert len(c.get_metric_history(trials[0].info.run_id, "val_r")) >= 1
    sweep_art = {a.path for a in c.list_artifacts(sweep.info.run_id, "sweep")}
    assert {"sweep/best_config.yaml", "sweep/trials.json", "sweep/importance.json"} <= sweep_art
    for fig in ("objective", "importance"):  # figures logged as figures, one folder each
        assert [a.path for a in c.list_artifacts(sweep.info.run_id, f"figures/{fig}")] == [f"figures/{fig}/{fig}.png"]

    ens = next(r for r in runs if r.data.tags.get("mirage.kind") == "ensemble")
    assert ens.info.status == "FINISHED"
    members = ens.data.tags["mirage.member_run_ids"].split(",")
    assert len(members) == 2 and all(c.get_run(m).info.status == "FINISHED" for m in members)
    assert ens.data.tags["mirage.weighting"].startswith("softmax")
    assert {"ensemble_r", "best_member_r", "ensemble_r/sub-01", "best_member_r/sub-01"} <= set(ens.data.metrics)
    ens_art = {a.path for a in c.list_artifacts(ens.info.run_id, "ensemble")}
    assert "ensemble/weights.npy" in ens_art
    ana = {a.path for a in c.list_artifacts(ens.info.run_id, "analysis")}
    assert {"analysis/dominant_modality.npy", "analysis/summary.json"} <= ana
    figs = {a.path for d in ("dominance", "layer_attention") for a in c.list_artifacts(ens.info.run_id, f"figures/{d}")}
    assert {"figures/dominance/dominance.png", "figures/layer_attention/layer_attention.png"} <= figs
    brain = {a.path for d in ("brain_map", "brain_networks", "brain_dominant_modality")
             for a in c.list_artifacts(ens.info.run_id, f"figures/{d}")}  # the synthetic release ships an atlas
    assert {"figures/brain_map/val_r_mean_glass.png", "figures/brain_map/val_r_mean_surface.png",
            "figures/brain_networks/brain_networks.png",
            "figures/brain_dominant_modality/brain_dominant_modality.png"} <= brain, brain

    mv = c.get_model_version_by_alias(REGISTRY, "champion")
    assert mv.run_id == ens.info.run_id
    assert ens.data.tags["mirage.champion_decision"] == "promoted"  # the first ensemble of the registry
    assert float(mv.tags["mirage.heldout_score"]) == pytest.approx(ens.data.metrics["ensemble_r"])
    summary = job["second"].stdout
    assert "mlflow ui --backend-store-uri " + uri in summary and "ensemble r" in summary


def test_registered_champion_loads_and_predicts(job):
    import mlflow.pyfunc

    from mirage.features.store import open_store
    from mirage.predictor import Predictor

    uri, cfg = job["uri"], job["cfg"]
    assert job["second"].returncode == 0
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        model = mlflow.pyfunc.load_model(f"models:/{REGISTRY}@champion")
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    feats = np.asarray(open_store(cfg.features).read("s06e01b"), dtype=np.float32)
    y = model.predict({"subject": "sub-02", "features": feats, "n_trs": 20})
    assert y.shape == (20, cfg.data.n_parcels) and np.isfinite(y).all()
    ens_dir = job["work"] / "out" / "ensembles" / "e2e-sweep-ensemble"
    direct = Predictor.from_path(ens_dir).predict_run(feats, "sub-02", 20)
    np.testing.assert_allclose(y, direct, rtol=1e-5, atol=1e-6)


def test_finished_sweep_rerun_with_another_config_is_refused(job):
    third = job["third"]
    assert third.returncode == 1, third.stdout[-2000:] + third.stderr[-2000:]
    assert "mirage: error: sweep 'e2e-sweep' was run with another config" in third.stderr
    assert "train.epochs: 2 -> 3" in third.stderr
    assert "Traceback" not in third.stderr
    assert len([r for r in _runs(job["uri"]) if r.data.tags.get("mirage.kind") == "sweep"]) == 1
