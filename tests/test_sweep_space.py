"""Search-space translation, resource arithmetic and sweep artifacts (no Ray cluster started)."""

from __future__ import annotations

import json

import pytest
import yaml
from mirage.config import ConfigError, load_config
from mirage.distributed.sweep import (
    SweepResult,
    TrialInfo,
    concurrency,
    search_space,
    trial_cpus,
    trial_resources,
    trial_runner,
    write_sweep_artifacts,
)
from mirage.errors import MirageError
from ray import tune


def test_every_param_kind_maps_to_its_tune_domain():
    cfg = load_config("demo", [
        "sweep.space={}",
        "sweep.space.model.n_queries={kind: choice, values: [2, 4]}",
        "sweep.space.model.depth={kind: int, low: 1, high: 3}",
        "sweep.space.train.lr={kind: loguniform, low: 1.0e-4, high: 1.0e-2}",
        "sweep.space.model.modality_dropout={kind: float, low: 0.0, high: 0.5}",
    ])
    space = search_space(cfg)
    assert set(space) == {"model.n_queries", "model.depth", "train.lr", "model.modality_dropout"}
    assert isinstance(space["model.n_queries"], tune.search.sample.Categorical)
    assert space["model.n_queries"].categories == [2, 4]
    d = space["model.depth"]
    assert isinstance(d, tune.search.sample.Integer) and (d.lower, d.upper) == (1, 4)  # randint upper is exclusive
    lr = space["train.lr"]
    assert isinstance(lr.sampler, tune.search.sample.LogUniform) and (lr.lower, lr.upper) == (1e-4, 1e-2)
    assert isinstance(space["model.modality_dropout"].sampler, tune.search.sample.Uniform)
    # sampled values apply to the config through the same override path as --set
    sample = {k: v.sample() for k, v in space.items()}
    out = cfg.with_overrides(sample)
    assert out.model.depth in (1, 2, 3) and out.model.n_queries in (2, 4)


@pytest.mark.parametrize(
    "entry, message",
    [
        ("sweep.space.model.nope={kind: int, low: 1, high: 2}", "sweep.space.model.nope"),
        ("sweep.space.model.depth={kind: int, low: 3, high: 1}", "sweep.space.model.depth: .*low <= high"),
        ("sweep.space.train.lr={kind: loguniform, low: 0, high: 1}", "sweep.space.train.lr: .*low > 0"),
        ("sweep.space.model.depth={kind: choice, values: []}", "sweep.space.model.depth: .*non-empty"),
    ],
)
def test_bad_space_entries_name_the_key(entry, message):
    with pytest.raises(ConfigError, match=message):
        search_space(load_config("demo", [entry]))


def test_concurrency_is_capped_by_logical_cpus():
    cfg = load_config("demo", ["sweep.max_concurrent=4", "train.num_workers=2", "train.cpus_per_worker=1"])
    assert trial_cpus(cfg) == 3
    assert concurrency(cfg, 8) == 2
    assert concurrency(cfg, None) == 4
    with pytest.raises(MirageError, match="ray.num_cpus"):
        concurrency(cfg, 2)


def test_trial_runner_and_what_a_trial_reserves():
    one = load_config("demo", ["train.num_workers=1", "train.cpus_per_worker=2", "sweep.driver_cpus=0.5"])
    assert trial_runner(one) == "direct"  # auto: one worker trains inside the trial
    assert trial_resources(one) == {"cpu": 2, "gpu": 0.0} and trial_cpus(one) == 2
    gpu = one.with_overrides({"train.use_gpu": True})
    assert trial_resources(gpu) == {"cpu": 2, "gpu": 1.0}
    forced = one.with_overrides({"sweep.trial_runner": "trainer"})
    assert trial_runner(forced) == "trainer"
    assert trial_resources(forced) == {"cpu": 0.5} and trial_cpus(forced) == 2.5
    two = load_config("demo", ["train.num_workers=2"])
    assert trial_runner(two) == "trainer"
    with pytest.raises(ConfigError, match="sweep.trial_runner=direct with train.num_workers=2"):
        trial_runner(two.with_overrides({"sweep.trial_runner": "direct"}))


def test_sweep_artifacts_and_importance(tmp_path):
    cfg = load_config("demo")
    trials = [
        TrialInfo(f"t{i}", {"model.depth": d, "train.lr": lr, "model.n_queries": 4, "model.modality_dropout": 0.1},
                  best=b, epochs=6, status="TERMINATED")
        for i, (d, lr, b) in enumerate([(1, 1e-3, 0.1), (2, 2e-3, 0.2), (3, 1e-3, 0.3), (2, 3e-3, 0.25)])
    ]
    res = SweepResult("s", "run", str(tmp_path), "val_r", "max", trials)
    assert res.best.trial_id == "t2"
    files = {p.name for p in write_sweep_artifacts(cfg, res, tmp_path / "a")}
    assert {"best_config.yaml", "trials.json", "objective.png", "importance.png", "importance.json"} <= files
    imp = json.loads((tmp_path / "a" / "importance.json").read_text())
    assert imp["method"] == "optuna.importance.FanovaImportanceEvaluator" and imp["n_trials"] == 4
    assert set(imp["importance"]) == set(cfg.sweep.space)
    assert max(imp["importance"], key=imp["importance"].get) == "model.depth"  # the best tracks depth
    assert imp["importance"]["model.n_queries"] == 0.0  # never varied
    best = yaml.safe_load((tmp_path / "a" / "best_config.yaml").read_text())
    assert best["model"]["depth"] == 3
    assert len(json.loads((tmp_path / "a" / "trials.json").read_text())) == 4
    res.save(tmp_path / "r.json")
    assert SweepResult.load(tmp_path / "r.json").best.params == trials[2].params


def test_a_failed_trial_never_ranks_even_with_the_best_metric():
    trials = [
        TrialInfo("ok", {}, best=0.2, epochs=2, status="TERMINATED"),
        TrialInfo("failed", {}, best=0.9, epochs=1, status="ERROR"),
        TrialInfo("early", {}, best=0.1, epochs=1, status="TERMINATED", stopped_early=True),
    ]
    res = SweepResult("s", "run", "/x", "val_r", "max", trials)
    assert [t.trial_id for t in res.ranked()] == ["ok", "early"] and res.best.trial_id == "ok"


def test_errored_trials_do_not_count_in_the_importance(tmp_path):
    cfg = load_config("demo")
    trials = [
        TrialInfo(f"t{i}", {"model.depth": d, "train.lr": 1e-3, "model.n_queries": 4, "model.modality_dropout": 0.1},
                  best=b, epochs=2, status=s)
        for i, (d, b, s) in enumerate([(1, 0.1, "TERMINATED"), (3, 0.3, "TERMINATED"), (2, 0.9, "ERROR"), (2, None, "ERROR")])
    ]
    write_sweep_artifacts(cfg, SweepResult("s", "run", str(tmp_path), "val_r", "max", trials), tmp_path / "a")
    imp = json.loads((tmp_path / "a" / "importance.json").read_text())
    assert (imp["n_trials"], imp["n_skipped"]) == (2, 2)
    assert max(imp["importance"], key=imp["importance"].get) == "model.depth"


def test_cluster_job_without_dataset_fails_clearly(tmp_path, monkeypatch):
    from mirage.cli import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    missing = tmp_path / "nowhere"
    rc = main(["sweep", "--set", f"outputs={tmp_path}", "--set", f"data.root={missing}", "--set", "ray.address=auto"])
    assert rc == 1
    assert not missing.exists()  # nothing generated on a cluster


def test_cluster_error_names_data_root(tmp_path):
    from mirage.pipeline.inputs import ensure_inputs
    from mirage.config import resolve_paths
    from mirage.errors import DataError

    cfg = resolve_paths(load_config("demo", [f"outputs={tmp_path}", "ray.address=auto"]))
    with pytest.raises(DataError, match=r"data.root=.*no dataset there.*--set data.root"):
        ensure_inputs(cfg)
