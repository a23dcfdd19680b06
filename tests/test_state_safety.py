"""State that must survive a crash or a changed command: the sweep state file, the ensemble folder,
training checkpoints and the registry's champion alias.

Real files, real torch.distributed.checkpoint shards, a real MLflow store (sqlite); faults are
injected by making a writer raise partway.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from mirage.config import load_config, resolve_paths
from mirage.distributed import sweep_state
from mirage.distributed.sweep import SweepResult, TrialInfo, load_sweep
from mirage.ensemble import write_ensemble_dir
from mirage.errors import MirageError
from mirage.train.loop import COMPLETE_FILE, STATE_FILE, LocalSession


# ----------------------------------------------------------------- sweep state


@pytest.fixture
def sweep_cfg(tmp_path):
    return resolve_paths(load_config("demo", [f"outputs={tmp_path / 'out'}", "sweep.name=safety"]))


def _finished(cfg) -> dict:
    res = SweepResult(cfg.sweep.name, "parent-run", cfg.train.storage, "val_r", "max")
    res.trials = [TrialInfo("t1", {"model.depth": 2}, 0.25, cfg.train.epochs, "TERMINATED", run_id="r1")]
    return asdict(res)


def test_sweep_state_is_replaced_through_a_new_file_not_rewritten_in_place(sweep_cfg):
    path = sweep_state.write_state(sweep_cfg, {"parent_run_id": "first"})
    with open(path) as reader:  # a reader holding the old file keeps a whole old version
        sweep_state.write_state(sweep_cfg, {**_finished(sweep_cfg), "parent_run_id": "second"})
        old = json.load(reader)
    assert old["parent_run_id"] == "first"
    new = json.loads(path.read_text())
    assert new["parent_run_id"] == "second" and new["trials"][0]["trial_id"] == "t1"
    assert new["config_hash"] == sweep_state.config_hash(sweep_state.defining_config(sweep_cfg))
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left


def test_sweep_state_write_that_fails_keeps_the_previous_state(sweep_cfg):
    path = sweep_state.write_state(sweep_cfg, {"parent_run_id": "first"})
    before = path.read_text()
    with pytest.raises(TypeError):
        sweep_state.write_state(sweep_cfg, {"parent_run_id": "second", "bad": {1j: 1}})  # not serialisable keys
    assert path.read_text() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_resume_with_another_config_is_refused_naming_the_differing_keys(sweep_cfg):
    sweep_state.write_state(sweep_cfg, {"parent_run_id": "p"})
    state = sweep_state.read_state(sweep_cfg)
    depth = sweep_cfg.model.depth
    other = sweep_cfg.with_overrides({"model.depth": depth + 1, "sweep.num_samples": sweep_cfg.sweep.num_samples + 3})
    with pytest.raises(MirageError) as e:
        sweep_state.check_same_config(other, state)
    msg = str(e.value)
    assert f"model.depth: {depth} -> {depth + 1}" in msg
    assert f"sweep.num_samples: {sweep_cfg.sweep.num_samples} -> {sweep_cfg.sweep.num_samples + 3}" in msg
    assert "safety" in msg and str(sweep_state.state_path(sweep_cfg)) in msg and "expected" in msg
    space = sweep_cfg.with_overrides({"sweep.space": {"train.lr": {"kind": "float", "low": 0.1, "high": 0.2}}})
    with pytest.raises(MirageError, match=r"sweep\.space\.model\.depth: .* -> <absent>"):
        sweep_state.check_same_config(space, state)
    # where things go and how fast they run may change on a resume
    moved = sweep_cfg.with_overrides({
        "tracking.uri": "sqlite:////elsewhere/mlflow.db", "sweep.max_concurrent": 7, "ray.num_cpus": 3,
        "train.num_workers": 2, "ensemble.n_members": 4, "train.loader_threads": 0,
    })
    sweep_state.check_same_config(moved, state)
    sweep_state.check_same_config(sweep_cfg, state)


def test_finished_sweep_is_not_reused_with_another_config(sweep_cfg):
    sweep_state.write_state(sweep_cfg, _finished(sweep_cfg))
    assert [t.trial_id for t in load_sweep(sweep_cfg).trials] == ["t1"]
    other = sweep_cfg.with_overrides({"train.lr": sweep_cfg.train.lr * 2})
    with pytest.raises(MirageError, match=r"train\.lr: "):
        load_sweep(other)


def test_mirage_ensemble_with_another_config_is_one_error_line(train_cfg, tmp_path, capsys):
    from conftest import TEST_OVERRIDES

    from mirage.cli import main

    sets = TEST_OVERRIDES + [
        f"outputs={tmp_path / 'out'}", "sweep.name=safety", f"data.root={train_cfg.data.root}",
        f"features.store={train_cfg.features.store}", "train.use_gpu=false",
    ]
    cfg = resolve_paths(load_config("demo", sets))
    sweep_state.write_state(cfg, _finished(cfg))
    depth = cfg.model.depth
    rc = main(["ensemble", "--config", "demo", *[a for x in sets + [f"model.depth={depth + 1}"] for a in ("--set", x)]])
    err = capsys.readouterr().err.strip()
    assert rc == 1
    assert err.startswith("mirage: error: sweep 'safety' was run with another config") and "\n" not in err
    assert f"model.depth: {depth} -> {depth + 1}" in err


# ------------------------------------------------------------- ensemble folder


def _members(tmp_path: Path, n: int = 2) -> list[Path]:
    out = []
    for i in range(n):
        d = tmp_path / f"member{i}"
        d.mkdir()
        (d / "model.safetensors").write_bytes(bytes([i]) * 16)
        out.append(d)
    return out


def _write(out: Path, members, tag: str) -> Path:
    w = np.full((len(members), 1, 3), 1.0 / len(members), dtype=np.float32)
    return write_ensemble_dir(out, members, w, ["sub-01"], {"tag": tag})


def test_ensemble_folder_write_that_fails_leaves_the_old_folder_and_no_scratch(tmp_path):
    parent = tmp_path / "ensembles"
    out = _write(parent / "ens", _members(tmp_path), "old")
    with pytest.raises(FileNotFoundError):
        _write(out, [tmp_path / "member0", tmp_path / "missing"], "new")  # the second copy fails midway
    assert json.loads((out / "ensemble.json").read_text())["tag"] == "old"
    assert sorted(p.name for p in (out / "members").iterdir()) == ["0", "1"]
    assert [p.name for p in parent.iterdir()] == ["ens"]


def test_ensemble_folder_swap_that_fails_restores_the_old_folder(tmp_path, monkeypatch):
    members = _members(tmp_path)
    out = _write(tmp_path / "ensembles" / "ens", members, "old")
    failed = []
    real_rename, real_replace = os.rename, os.replace

    def failing_once(real):
        def move(src, dst, *a, **k):
            if Path(dst) == out and not failed:
                failed.append(src)
                raise OSError("simulated failure moving the new folder into place")
            return real(src, dst, *a, **k)
        return move

    monkeypatch.setattr(os, "rename", failing_once(real_rename))
    monkeypatch.setattr(os, "replace", failing_once(real_replace))
    with pytest.raises(OSError, match="simulated"):
        _write(out, members, "new")
    monkeypatch.undo()
    assert failed, "the swap never moved a folder onto the target"
    assert json.loads((out / "ensemble.json").read_text())["tag"] == "old"
    assert [p.name for p in out.parent.iterdir()] == ["ens"]
    assert json.loads((_write(out, members, "new") / "ensemble.json").read_text())["tag"] == "new"


def test_ensemble_folder_never_uses_a_fixed_scratch_name(tmp_path):
    members = _members(tmp_path)
    out = tmp_path / "ensembles" / "ens"
    other = out.with_name("ens.tmp")  # a scratch folder of another writer under the old fixed name
    other.mkdir(parents=True)
    (other / "in-progress").write_text("x")
    _write(out, members, "mine")
    assert (other / "in-progress").read_text() == "x"
    assert json.loads((out / "ensemble.json").read_text())["tag"] == "mine"


# ----------------------------------------------------------------- checkpoints


def _dcp_checkpoint(path: Path) -> None:
    from mirage.train import fsdp

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    path.mkdir(parents=True)
    fsdp.save_checkpoint(path, model, opt)
    torch.save({"fit_state": "{}"}, path / STATE_FILE)


def test_ray_resume_skips_a_checkpoint_without_its_marker(tmp_path):
    from mirage.distributed.train import latest_complete_checkpoint
    from mirage.train.loop import mark_complete

    for e in (0, 1):
        _dcp_checkpoint(tmp_path / f"epoch_{e:04d}")
    assert latest_complete_checkpoint(tmp_path) is None  # every file there, none marked
    mark_complete(tmp_path / "epoch_0000", 0, 1)
    assert latest_complete_checkpoint(tmp_path) == tmp_path / "epoch_0000"
    mark_complete(tmp_path / "epoch_0001", 1, 1)
    assert latest_complete_checkpoint(tmp_path) == tmp_path / "epoch_0001"
    with pytest.raises(FileNotFoundError):
        mark_complete(tmp_path / "epoch_0002", 2, 1)  # never persisted: nothing to mark


def test_local_session_marks_a_checkpoint_only_after_its_files(tmp_path):
    session = LocalSession(tmp_path)

    def write(path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        (path / STATE_FILE).write_bytes(b"state")

    session.report({"epoch": 0}, write)
    assert json.loads((tmp_path / "epoch_0000" / COMPLETE_FILE).read_text()) == {"epoch": 0, "world_size": 1}

    def write_then_crash(path: Path) -> None:
        write(path)
        raise RuntimeError("worker lost after its state file")

    with pytest.raises(RuntimeError):
        session.report({"epoch": 1}, write_then_crash)
    assert (tmp_path / "epoch_0001" / STATE_FILE).is_file() and not (tmp_path / "epoch_0001" / COMPLETE_FILE).exists()
    assert session.latest() == tmp_path / "epoch_0000"
    (tmp_path / "epoch_0001" / "stale").write_text("from the failed attempt")
    session.report({"epoch": 1}, write)  # the epoch trained again replaces the half-written folder
    assert session.latest() == tmp_path / "epoch_0001" and not (tmp_path / "epoch_0001" / "stale").exists()


def test_training_resumes_from_the_last_marked_checkpoint(train_cfg, feature_store, tmp_path):
    from mirage.train.loop import fit

    cfg = train_cfg.with_overrides({"train.epochs": 3})

    class Crash(RuntimeError):
        pass

    class CrashAfterFiles(LocalSession):
        """Epoch 1's files reach the disk, then the process dies before the checkpoint is complete."""

        def report(self, metrics, write):
            if metrics["epoch"] == 1:
                def write_and_die(path):
                    write(path)
                    raise Crash("killed after writing")
                return super().report(metrics, write_and_die)
            return super().report(metrics, write)

    with pytest.raises(Crash):
        fit(cfg, CrashAfterFiles(tmp_path), store=feature_store)
    assert (tmp_path / "epoch_0001" / STATE_FILE).is_file()
    resumed = fit(cfg, LocalSession(tmp_path), store=feature_store)
    assert [h["epoch"] for h in resumed["history"]] == [0, 1, 2]
    assert [h["start_epoch"] for h in resumed["history"]] == [0, 1, 1]  # epoch 1 trained again, not skipped


@pytest.mark.slow
def test_two_rank_checkpoint_is_marked_once_both_ranks_wrote(train_cfg, feature_store, tmp_path):
    from mirage.train.launch import spawn

    spawn(train_cfg.with_overrides({"train.epochs": 1, "train.loader_threads": 0}), tmp_path, nprocs=2)
    ckpt = tmp_path / "epoch_0000"
    assert json.loads((ckpt / COMPLETE_FILE).read_text()) == {"epoch": 0, "world_size": 2}
    assert (ckpt / ".metadata").is_file() and (ckpt / STATE_FILE).is_file()
    assert LocalSession(tmp_path).latest() == ckpt


# -------------------------------------------------------------------- champion


@pytest.fixture
def registry_cfg(test_cfg, tmp_path):
    return test_cfg.with_overrides({
        "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "tracking.experiment": "champion-test",
        "ensemble.registry_name": "champion-test",
    })


def _ensemble_version(cfg, tmp_path: Path, score: float | None) -> tuple[str, str]:
    """An ensemble run (with its held-out metric) and a registered version of its artifact."""
    from mirage import tracking

    c = tracking.client(cfg.tracking.uri)
    run_id = c.create_run(tracking.ensure_experiment(cfg.tracking)).info.run_id
    if score is not None:
        tracking.log_metrics(cfg.tracking.uri, run_id, {"ensemble_r": score}, step=0)
    d = tmp_path / f"art-{run_id}"
    d.mkdir()
    (d / "ensemble.json").write_text("{}")
    c.log_artifacts(run_id, str(d), "model")
    try:
        c.create_registered_model(cfg.ensemble.registry_name)
    except Exception:  # noqa: BLE001 - exists after the first version
        pass
    mv = c.create_model_version(cfg.ensemble.registry_name, f"{c.get_run(run_id).info.artifact_uri}/model", run_id=run_id)
    return run_id, str(mv.version)


def test_champion_moves_only_to_an_ensemble_scoring_at_least_as_well(registry_cfg, tmp_path):
    from mirage import tracking

    uri, name, alias = registry_cfg.tracking.uri, registry_cfg.ensemble.registry_name, registry_cfg.ensemble.alias
    c = tracking.client(uri)

    def holder() -> str:
        return str(c.get_model_version_by_alias(name, alias).version)

    r1, v1 = _ensemble_version(registry_cfg, tmp_path, 0.30)
    d1 = tracking.update_champion(registry_cfg, r1, v1, 0.30)
    assert d1.promoted and holder() == v1 and d1.reason == "no current champion"

    r2, v2 = _ensemble_version(registry_cfg, tmp_path, 0.20)
    d2 = tracking.update_champion(registry_cfg, r2, v2, 0.20)
    assert not d2.promoted and holder() == v1
    tags = c.get_run(r2).data.tags
    assert tags["mirage.champion_decision"] == "kept"
    assert float(tags["mirage.champion_score"]) == 0.20 and float(tags["mirage.champion_previous_score"]) == 0.30
    assert tags["mirage.champion_previous_version"] == v1 and "0.2 < champion's 0.3" in tags["mirage.champion_reason"]

    r3, v3 = _ensemble_version(registry_cfg, tmp_path, 0.30)  # a tie takes the alias
    assert tracking.update_champion(registry_cfg, r3, v3, 0.30).promoted and holder() == v3
    assert c.get_run(r3).data.tags["mirage.champion_decision"] == "promoted"

    r4, v4 = _ensemble_version(registry_cfg, tmp_path, 0.10)
    forced = tracking.update_champion(registry_cfg.with_overrides({"ensemble.promote": True}), r4, v4, 0.10)
    assert forced.promoted and holder() == v4 and "forced" in forced.reason
    assert c.get_run(r4).data.tags["mirage.champion_previous_version"] == v3


def test_champion_score_falls_back_to_its_runs_metric(registry_cfg, tmp_path):
    from mirage import tracking

    c = tracking.client(registry_cfg.tracking.uri)
    r1, v1 = _ensemble_version(registry_cfg, tmp_path, 0.40)
    c.set_registered_model_alias(registry_cfg.ensemble.registry_name, registry_cfg.ensemble.alias, v1)  # no score tag
    r2, v2 = _ensemble_version(registry_cfg, tmp_path, 0.35)
    d = tracking.update_champion(registry_cfg, r2, v2, 0.35)
    assert not d.promoted and d.previous_score == pytest.approx(0.40)
    r3, v3 = _ensemble_version(registry_cfg, tmp_path, None)
    d = tracking.update_champion(registry_cfg, r3, v3, None)
    assert not d.promoted and "no held-out" in d.reason


@pytest.mark.parametrize("command", ["sweep", "ensemble"])
def test_promote_flag_forces_the_alias_move(test_cfg, command):
    from mirage.cli import build_parser
    from mirage.commands.sweep import _ensemble_overrides

    assert _ensemble_overrides(test_cfg, build_parser().parse_args([command, "--promote"])).ensemble.promote
    assert not _ensemble_overrides(test_cfg, build_parser().parse_args([command])).ensemble.promote
