"""CLI conventions: --version, python -m mirage, config show, choices, presets in the wheel, progress output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from mirage.cli import main
from mirage.config import load_config, resolve_paths

ROOT = Path(__file__).resolve().parents[1]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def _sets(overrides: list[str]) -> list[str]:
    return [x for o in overrides for x in ("--set", o)]


# ------------------------------------------------------------------ version


def test_version_flag_prints_the_distribution_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"mirage {VERSION}" == f"mirage {version('mirage-platform')}"


def test_python_dash_m_mirage_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "mirage", "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == f"mirage {VERSION}", out.stderr


# -------------------------------------------------------------- config show


def test_config_show_json_is_the_resolved_config(tmp_path, capsys):
    sets = ["features.revision=20240101", "train.epochs=3", f"outputs={tmp_path}"]
    assert main(["config", "show", "--json", "--config", "paper", *_sets(sets)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown == resolve_paths(load_config("paper", sets)).to_dict()
    assert shown["features"]["revision"] == "20240101" and shown["train"]["epochs"] == 3
    assert shown["data"]["root"] == str(tmp_path / "data")  # derived paths are resolved


def test_config_show_yaml_reads_back_as_the_same_config(tmp_path, capsys):
    assert main(["config", "show", "--set", f"outputs={tmp_path}"]) == 0
    text = capsys.readouterr().out
    assert yaml.safe_load(text) == resolve_paths(load_config("demo", [f"outputs={tmp_path}"])).to_dict()
    (tmp_path / "shown.yaml").write_text(text)
    assert load_config(str(tmp_path / "shown.yaml")).to_dict() == yaml.safe_load(text)


def test_config_show_mistyped_key_is_one_line_with_a_suggestion(capsys):
    assert main(["config", "show", "--set", "train.epoch=3"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("mirage: error: unknown config key 'train.epoch'") and "did you mean 'train.epochs'?" in err


# ------------------------------------------------------------------ choices


def test_score_split_accepts_only_its_choices(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["score", str(tmp_path / "predictions_val.npz"), "--split", "friends-s8"])
    assert e.value.code == 2
    assert "invalid choice: 'friends-s8'" in capsys.readouterr().err


# --------------------------------------------------------- presets in the wheel


def test_the_built_wheel_ships_the_presets(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        (src / name).write_bytes((ROOT / name).read_bytes())
    subprocess.run(["cp", "-r", str(ROOT / "platform"), str(src / "platform")], check=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(src)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = tmp_path.glob("mirage_platform-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"mirage/presets/demo.yaml", "mirage/presets/paper.yaml", "mirage/__main__.py"} <= names

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # a pure-Python wheel installs by unpacking
    env = {**os.environ, "PYTHONPATH": str(site)}
    probe = "import mirage, mirage.config as c; print(mirage.__file__); print(c.preset_path('paper'))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    assert out == [str(site / "mirage" / "__init__.py"), str(site / "mirage" / "presets" / "paper.yaml")]
    shown = subprocess.run([sys.executable, "-m", "mirage", "config", "show", "--json", "-c", "paper"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["data"]["n_parcels"] == load_config("paper").data.n_parcels


# ----------------------------------------------------------------- progress


def test_epoch_line_names_epoch_loss_val_r_and_seconds(capsys):
    from mirage.distributed.progress import EpochLines

    metrics = {"epoch": 2, "train_loss": 0.81234, "epoch_s": 4.21, "val_r": 0.12341, "best_val_r": 0.13, "is_best": 0}
    EpochLines(epochs=6).after_report(run_context=None, metrics=[metrics, {**metrics, "train_loss": 9.0}],
                                      checkpoint=None)
    assert capsys.readouterr().err == "epoch 3/6: train loss 0.8123 (4.2 s), val r 0.1234, best 0.1300\n"


def test_progress_is_a_bar_on_a_terminal(monkeypatch):
    import io

    from mirage.progress import tracked

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    assert list(tracked(["a", "b", "c"], "extract")) == ["a", "b", "c"]
    shown = term.getvalue()
    assert "extract" in shown and "3/3" in shown and "\x1b[" in shown  # drawn with terminal control codes
    assert "extract 1/3 a" not in shown  # not the log lines


def test_extract_local_shows_each_stimulus_done(test_cfg, synth_root, feature_store, capsys):
    from conftest import TEST_OVERRIDES

    stimuli = ["s06e01b", "s07e01a"]  # already in the session's store: counted as done without a model load
    sets = [*TEST_OVERRIDES, f"outputs={test_cfg.outputs}", f"data.root={synth_root}",
            f"features.store={test_cfg.features.store}"]
    assert main(["extract", "--local", "--stimuli", *stimuli, *_sets(sets)]) == 0
    captured = capsys.readouterr()
    lines = [x for x in captured.err.splitlines() if x.startswith("extract ")]
    assert [x.split(" (")[0] for x in lines] == ["extract 1/2 s06e01b", "extract 2/2 s07e01a"]
    assert "2 already stored" in captured.out and "extract 1/2" not in captured.out  # stdout: the result only


def test_baseline_shows_each_subject_done(test_cfg, synth_root, feature_store, capsys):
    from conftest import TEST_OVERRIDES

    sets = [*TEST_OVERRIDES, f"outputs={test_cfg.outputs}", f"data.root={synth_root}",
            f"features.store={test_cfg.features.store}"]
    assert main(["baseline", "--which", "native_linear", "--no-track", *_sets(sets)]) == 0
    captured = capsys.readouterr()
    lines = [x.split(" (")[0] for x in captured.err.splitlines() if x.startswith("baseline ")]
    subjects = test_cfg.data.subjects
    assert lines == [f"baseline native_linear {i}/{len(subjects)} {s}" for i, s in enumerate(subjects, 1)]
    assert "native_linear: val r" in captured.out


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_train_prints_one_line_per_epoch(test_cfg, synth_root, feature_store, tmp_path):
    from conftest import TEST_OVERRIDES

    sets = [*TEST_OVERRIDES, f"outputs={tmp_path}", f"data.root={synth_root}",
            f"features.store={test_cfg.features.store}", "train.epochs=2", "train.use_gpu=false",
            "train.num_workers=1"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-m", "mirage", "train", "--no-track", *_sets(sets)], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=540)
    assert out.returncode == 0, out.stderr[-3000:]
    for epoch in (1, 2):
        assert f"epoch {epoch}/2: train loss " in out.stderr, out.stderr[-3000:]
    assert json.loads(out.stdout)["epochs"] == [0, 1]  # stdout: the result only
