"""Several Ray nodes on this machine (:class:`mirage.distributed.sim_cluster.SimCluster`): a head that
runs no work and carries the driver, three ``gpu_group`` nodes of one slot each (two for the work,
one spare) and a ``cpu_group`` node whose CPUs the work would take if it did not request its group's
resource. Each test checks placement, then kills a node in the middle of the run, the way a spot GPU
node goes, and checks that the run completes with nothing lost or doubled:

- extraction: two actors on two different GPU nodes; one node lost after the first span is on disk;
  every stimulus stored once, with the same features as the in-process path;
- FSDP2 training with two workers on two nodes; one node lost after the first checkpoint; the run
  resumes from it on the surviving nodes and its MLflow run is FINISHED;
- a sweep whose two trials run on two nodes; one node lost after both checkpointed; the lost trial
  resumes elsewhere, the sweep finishes and every MLflow run has its true status.

The seconds from each kill to completion (and to the resumed worker group) are printed (``-s``).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from mirage.distributed.sim_cluster import CPU_GROUP, GPU_GROUP
from conftest import SIM_GPU_NODES
from run_helpers import in_thread

pytestmark = [pytest.mark.timeout(600)]

STIMULI = ["s07e01b", "chaplin2"]


# --------------------------------------------------------------------- helpers


def _alive_actors(class_name: str) -> list:
    """Live actors whose class name contains ``class_name`` (Ray Data names its pool's actors after the
    callable class) in the connected cluster: their node ids and pids."""
    import ray
    from ray.util.state import list_actors

    actors = list_actors(
        address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")], limit=1000
    )
    return [a for a in actors if class_name in (a.class_name or "")]


def _wait_for(predicate, timeout: float, what: str):
    """Poll ``predicate`` until it returns something truthy; that value, or TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout:g} s")
        time.sleep(0.2)


def _join(thread, out: dict, timeout: float):
    thread.join(timeout=timeout)
    assert not thread.is_alive(), f"the run did not finish within {timeout:g} s of the node loss"
    if "error" in out:
        raise out["error"]
    return out["result"]


@pytest.fixture
def gpu_nodes(sim_cluster):
    """The cluster with ``SIM_GPU_NODES`` live ``gpu_group`` nodes (a node killed by an earlier test
    is replaced, as KubeRay replaces a lost pod); their node ids."""
    while len(sim_cluster.nodes(GPU_GROUP)) < SIM_GPU_NODES:
        sim_cluster.add_node(GPU_GROUP, slots=1, cpus=2)
    return {n.node_id for n in sim_cluster.nodes(GPU_GROUP)}


def _checkpointed(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a complete checkpoint (older ones are pruned as newer ones complete)."""
    from mirage.train.loop import is_complete

    return any(is_complete(d) for d in run_dir.glob("epoch_[0-9][0-9][0-9][0-9]"))


def _report(what: str, **seconds: float) -> None:
    print(f"\n[node loss] {what}: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))


def test_work_requests_its_worker_group():
    from mirage.config import load_config
    from mirage.distributed.sweep import trial_resources

    cfg = load_config("demo", ["train.worker_resources={gpu_group: 1}", "train.cpus_per_worker=2"])
    assert trial_resources(cfg) == {"cpu": 2, "gpu": 0.0, GPU_GROUP: 1}  # a direct trial is its own worker
    trainer = cfg.with_overrides({"train.num_workers": 2, "sweep.driver_cpus": 0.5})
    assert trial_resources(trainer) == {"cpu": 0.5}  # a trainer trial's driver: its workers ask for the group
    pinned = load_config("demo", ["train.worker_resources={gpu_group: 1}", "train.num_workers=2",
                                  "sweep.driver_resources={cpu_group: 1}"])
    assert trial_resources(pinned) == {"cpu": 1.0, CPU_GROUP: 1}  # the driver on the CPU group
    assert trial_resources(pinned.with_overrides({"train.num_workers": 1})) == {"cpu": 1.0, "gpu": 0.0, GPU_GROUP: 1}


# ------------------------------------------------------------------ extraction


def test_extraction_actors_on_gpu_nodes_survive_losing_one(sim_cluster, gpu_nodes, synth_root, feature_store,
                                                          test_cfg, tmp_path):
    import ray

    from mirage.distributed.extract import run_extract
    from mirage.features.store import open_store

    cfg = test_cfg.with_overrides({
        "data.root": str(synth_root), "features.store": str(tmp_path / "store"), "ray.address": sim_cluster.address,
        "features.actors": 2, "features.cutoffs_per_item": 10, "features.resources": {GPU_GROUP: 1},
    })
    assert ray.get_runtime_context().get_node_id() == sim_cluster.head_node_id  # the driver runs on the head
    seen: dict = {}

    def kill_after_first_span():
        _wait_for(lambda: list((tmp_path / "store").rglob("*.npz")), 300, "a span file on disk")
        actors = _wait_for(lambda: (a := _alive_actors("ExtractActor")) and len(a) == 2 and a, 60, "two live actors")
        seen["actor_nodes"] = [a.node_id for a in actors]
        seen["killed_at"] = time.monotonic()
        seen["dead_after"] = sim_cluster.remove_node(sim_cluster.node(actors[0].node_id))

    killer = threading.Thread(target=kill_after_first_span, daemon=True)
    killer.start()
    result = run_extract(cfg, stimuli=STIMULI)
    done = time.monotonic()
    killer.join(timeout=90)
    assert "killed_at" in seen, "no node was killed while extraction ran"

    nodes = seen["actor_nodes"]
    assert len(set(nodes)) == 2 and set(nodes) <= gpu_nodes, (nodes, gpu_nodes)  # one GPU node per actor
    assert sim_cluster.head_node_id not in nodes
    assert result.ok and sorted(result.written) == sorted(STIMULI), result.failed  # each stimulus committed once
    store = open_store(cfg.features)
    assert store.stimuli() == sorted(STIMULI) and store.verify() == {}
    for sid in STIMULI:  # a span joined twice would add its word vectors twice: not equal to the in-process run
        np.testing.assert_allclose(store.read(sid), feature_store.read(sid), rtol=1e-2, atol=1e-3)
    _report("extraction", dead_after_kill=seen["dead_after"], done_after_kill=done - seen["killed_at"])


# -------------------------------------------------------------------- training


def test_fsdp_training_on_two_nodes_resumes_after_losing_one(sim_cluster, gpu_nodes, train_cfg, tmp_path):
    from mlflow import MlflowClient

    from mirage.distributed.train import run_training
    from mirage.train.loop import is_complete

    epochs = 4
    cfg = train_cfg.with_overrides({
        "train.epochs": epochs, "train.num_workers": 2, "train.max_failures": 1, "train.cpus_per_worker": 1,
        "train.worker_resources": {GPU_GROUP: 1}, "train.storage": str(tmp_path / "ray"),
        "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "tracking.experiment": "multinode",
        "ray.address": sim_cluster.address,
    })
    run_dir = tmp_path / "ray" / "spread"
    thread, out = in_thread(lambda: run_training(cfg, name="spread"))

    _wait_for(lambda: _checkpointed(run_dir), 300, "the first complete checkpoint")
    workers = _alive_actors("RayTrainWorker")
    nodes = {w.node_id for w in workers}
    assert len(workers) == 2 and len(nodes) == 2 and nodes <= gpu_nodes, (workers, gpu_nodes)  # one rank per node
    victim = sim_cluster.node(workers[0].node_id)
    killed_at = time.monotonic()
    dead_after = sim_cluster.remove_node(victim)
    again = _wait_for(
        lambda: (w := _alive_actors("RayTrainWorker")) and len(w) == 2 and all(a.node_id != victim.node_id for a in w) and w,
        300, "two Train workers on the surviving nodes",
    )
    resumed_after = time.monotonic() - killed_at
    res = _join(thread, out, 300)

    assert {w.node_id for w in again} <= gpu_nodes - {victim.node_id}
    assert [h["epoch"] for h in res.history] == list(range(epochs))  # every epoch once, none lost or doubled
    assert max(h["start_epoch"] for h in res.history) >= 1  # the survivors continued from a checkpoint
    assert is_complete(run_dir / f"epoch_{epochs - 1:04d}")
    run = MlflowClient(tracking_uri=cfg.tracking.uri).get_run(res.mlflow_run_id)
    assert run.info.status == "FINISHED"
    _report("training", dead_after_kill=dead_after, workers_back_after_kill=resumed_after,
            done_after_kill=out["done_at"] - killed_at)


# ----------------------------------------------------------------------- sweep


TRIAL_ACTOR = "ImplicitFunc"  # the actor class of a Tune function trial


def test_sweep_trials_on_two_nodes_finish_after_losing_one(sim_cluster, gpu_nodes, train_cfg, tmp_path):
    from mlflow import MlflowClient
    from ray.tune import ExperimentAnalysis

    from mirage.distributed.sweep import experiment_path, run_sweep

    epochs = 8  # a tiny epoch takes about a second: time to lose a node while both trials still train
    cfg = train_cfg.with_overrides({
        "train.epochs": epochs, "train.max_failures": 1, "train.worker_resources": {GPU_GROUP: 1},
        "train.storage": str(tmp_path / "ray"), "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "tracking.experiment": "multinode-sweep", "ray.address": sim_cluster.address,
        "sweep.name": "spread", "sweep.num_samples": 2, "sweep.max_concurrent": 2, "sweep.n_startup_trials": 2,
        # one point: equal trials report equal scores, so ASHA stops none and every trial run can finish
        "sweep.space": {"model.depth": {"kind": "choice", "values": [1]}},
    })
    thread, out = in_thread(lambda: run_sweep(cfg))

    def both_checkpointed():
        runs = [d for d in (tmp_path / "ray").glob("spread-*") if _checkpointed(d)]
        trials = _alive_actors(TRIAL_ACTOR)
        return len(runs) == 2 and len(trials) == 2 and trials

    trials = _wait_for(both_checkpointed, 300, "two running trials with a checkpoint each")
    nodes = {t.node_id for t in trials}
    assert len(nodes) == 2 and nodes <= gpu_nodes, (trials, gpu_nodes)  # one trial per GPU node
    killed_at = time.monotonic()
    dead_after = sim_cluster.remove_node(sim_cluster.node(trials[0].node_id))
    res = _join(thread, out, 400)

    assert not res.interrupted and len(res.trials) == 2
    for t in res.trials:
        assert t.status == "TERMINATED" and (t.epochs == epochs or t.stopped_early), t
    ea = ExperimentAnalysis(str(experiment_path(cfg)))
    failures = {t.trial_id: t.run_metadata.num_failures for t in ea.trials}
    assert sorted(failures.values()) == [0, 1], failures  # the lost trial was retried once, elsewhere ...
    (lost,) = [tid for tid, n in failures.items() if n == 1]
    assert ea.trial_dataframes[lost]["start_epoch"].max() >= 1  # ... from its last checkpoint
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    exp = client.get_experiment_by_name("multinode-sweep")
    runs = {r.info.run_id: r for r in client.search_runs([exp.experiment_id])}
    assert len(runs) == 3  # the sweep and its two trials: the retried trial kept its run
    assert runs[res.parent_run_id].info.status == "FINISHED"
    for t in res.trials:  # each trial run closed with its true status: finished, or stopped by ASHA
        assert runs[t.run_id].info.status == ("KILLED" if t.stopped_early else "FINISHED"), t
    _report("sweep", dead_after_kill=dead_after, done_after_kill=out["done_at"] - killed_at)
