"""Extraction into the store on the synthetic dataset: contents, resume, faults (in-process runner)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mirage.cli import main as cli_main
from mirage.data.layout import Release
from mirage.data.media import MediaReader
from mirage.features.extract import extract_all
from mirage.features.store import FeatureStore, open_store, store_key

SUBSET = ["chaplin1", "life01", "s01e01a", "s06e01b"]


@pytest.fixture
def dataset_copy(synth_root, tmp_path) -> Path:
    """The stimuli of the test dataset copied (fMRI linked), so a test may damage them."""
    root = tmp_path / "data"
    shutil.copytree(Path(synth_root) / "stimuli", root / "stimuli")
    (root / "fmri").symlink_to(Path(synth_root) / "fmri", target_is_directory=True)
    return root


def _cfg(test_cfg, root, store):
    return test_cfg.with_overrides({"data.root": str(root), "features.store": str(store)})


def test_store_holds_every_stimulus_with_the_expected_shape(feature_store, synth_root, test_cfg):
    from mirage.config import MODALITIES
    from mirage.features.extract import plan_stimulus

    stimuli = Release(synth_root).stimuli()
    assert feature_store.stimuli() == sorted(stimuli)
    assert feature_store.verify() == {}
    f = test_cfg.features
    for sid, st in stimuli.items():
        plan = plan_stimulus(st.video, st.transcript, f)
        with MediaReader(st.video) as m:  # audio and vision: one frame per 0.5 s of the movie
            assert plan.frames["vision"] == plan.frames["audio"] == max(1, round(2 * m.printed_duration))
        assert feature_store.modality_frames(sid) == plan.frames
        arr = feature_store.read(sid)
        assert arr.shape == (max(plan.frames.values()), 3, f.tiny.n_layers + 1, f.tiny.hidden)
        assert arr.dtype == np.float16 and np.isfinite(arr).all()
        for k, m in enumerate(MODALITIES):  # zero past each modality's own count
            assert not arr[plan.frames[m]:, k].any(), (sid, m)
        for k in (0, 1):  # vision, audio in every frame of their own
            n = plan.frames[MODALITIES[k]]
            assert np.abs(arr[:n, k]).min(axis=(1, 2)).max() > 0 and np.abs(arr[:n, k]).sum(axis=(1, 2)).min() > 0
    # chaplin has no transcript: no text features; dialogue movies do have some
    assert not feature_store.read("chaplin1")[:, 2].any()
    assert feature_store.read("s01e01a")[:, 2].any()
    assert feature_store.key == store_key(test_cfg.features)


def test_features_follow_the_stimulus(feature_store):
    """Different movies give different features; frames within one movie differ over time."""
    a, b = feature_store.read("s01e01a"), feature_store.read("s01e01b")
    assert not np.array_equal(a[:, 0], b[:, 0])
    assert np.std(a[:, 0, -1].astype(np.float32), axis=0).mean() > 0


def test_rerun_recomputes_nothing(feature_store, synth_root, test_cfg):
    mtimes = {s: feature_store.path(s).stat().st_mtime_ns for s in feature_store.stimuli()}
    result = extract_all(test_cfg.with_overrides({"data.root": str(synth_root)}))
    assert result.written == [] and sorted(result.skipped) == feature_store.stimuli() and result.ok
    assert mtimes == {s: feature_store.path(s).stat().st_mtime_ns for s in feature_store.stimuli()}


def test_overwrite_recomputes_identically(feature_store, synth_root, test_cfg, tmp_path):
    cfg = _cfg(test_cfg, synth_root, tmp_path / "store")
    first = extract_all(cfg, stimuli=["s07e01a"])
    again = extract_all(cfg, stimuli=["s07e01a"], overwrite=True)
    assert first.written == again.written == ["s07e01a"]
    np.testing.assert_array_equal(open_store(cfg.features).read("s07e01a"), feature_store.read("s07e01a"))


def test_corrupt_movie_fails_alone(feature_store, dataset_copy, test_cfg, tmp_path, capsys):
    bad = Release(dataset_copy).stimuli()["life01"].video
    raw = bad.read_bytes()
    bad.write_bytes(raw[:200] + bytes(len(raw) - 200))  # header kept, every packet zeroed
    cfg = _cfg(test_cfg, dataset_copy, tmp_path / "store")
    overrides = [f"data.root={dataset_copy}", f"features.store={tmp_path / 'store'}", *_test_overrides(test_cfg)]
    code = cli_main(["extract", "--local", "--stimuli", *SUBSET, *sum([["--set", o] for o in overrides], [])])
    err = capsys.readouterr().err
    assert code == 1
    assert "life01" in err and str(bad) in err
    store = open_store(cfg.features)
    assert store.stimuli() == sorted(set(SUBSET) - {"life01"})
    assert not store.path("life01").exists() and not list(store.root.glob("*.tmp-*"))
    for sid in store.stimuli():
        np.testing.assert_array_equal(store.read(sid), feature_store.read(sid))


def _test_overrides(test_cfg) -> list[str]:
    """The session's data/features settings as --set overrides (for a subprocess or the CLI)."""
    from conftest import TEST_OVERRIDES

    return [*TEST_OVERRIDES, f"outputs={test_cfg.outputs}"]


def test_killed_job_resumes_without_redoing_work(feature_store, synth_root, test_cfg, tmp_path):
    store_root = tmp_path / "store"
    cfg = _cfg(test_cfg, synth_root, store_root)
    overrides = [f"data.root={synth_root}", f"features.store={store_root}", *_test_overrides(test_cfg),
                 "features.cutoffs_per_item=8"]
    cmd = [sys.executable, "-c", "import sys; from mirage.cli import main; sys.exit(main(sys.argv[1:]))",
           "extract", "--local", "--stimuli", *SUBSET, *sum([["--set", o] for o in overrides], [])]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = store_root / store_key(cfg.features) / "manifest.json"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if manifest.is_file() and json.loads(manifest.read_text())["stimuli"]:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the job ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = FeatureStore(manifest.parent)
    done = before.stimuli()
    assert 1 <= len(done) < len(SUBSET)
    mtimes = {s: before.path(s).stat().st_mtime_ns for s in done}

    result = extract_all(cfg, stimuli=SUBSET)
    assert sorted(result.skipped) == done and sorted(result.written) == sorted(set(SUBSET) - set(done))
    store = open_store(cfg.features)
    assert store.stimuli() == sorted(SUBSET) and store.verify() == {}
    files = sorted(p.name for p in store.root.iterdir() if not p.name.startswith("."))  # .lease, .spans: the writer's
    assert files == sorted([f"{s}.npy" for s in SUBSET] + ["manifest.json"])
    assert mtimes == {s: store.path(s).stat().st_mtime_ns for s in done}  # finished work not redone
    for sid in SUBSET:
        np.testing.assert_array_equal(store.read(sid), feature_store.read(sid))


def test_verify_command(feature_store, synth_root, test_cfg, capsys):
    sets = sum([["--set", o] for o in [f"data.root={synth_root}", *_test_overrides(test_cfg)]], [])
    assert cli_main(["features", "verify", *sets]) == 0
    assert f"{len(feature_store.stimuli())} stimuli, 0 problems" in capsys.readouterr().out


def test_posthoc_fusion_runs_each_modality_alone(feature_store, synth_root, test_cfg):
    from mirage.features.extract import Extractor, FeatureArrays

    st = Release(synth_root).stimuli()["s01e01a"]
    posthoc = test_cfg.features.model_copy(update={"fusion": "posthoc"})
    assert store_key(posthoc) != store_key(test_cfg.features)
    ex = Extractor(posthoc)
    plan = ex.plan(st.video, st.transcript)
    first_word = next(i for i, p in enumerate(plan.passes) if p.words)
    sink = FeatureArrays(plan.frames, ex.backbone.n_layers, ex.backbone.dim)
    ex.extract_passes(plan, first_word, first_word + 6).write(sink)
    native = np.asarray(feature_store.read("s01e01a"), dtype=np.float32)
    for k, m in enumerate(("vision", "audio", "text")):
        got = sink.arrays[m]
        done = np.abs(got).sum(axis=(1, 2)) > 0
        assert done.any(), m
        # each modality alone through the backbone: other numbers than in the joint pass
        assert np.abs(got[done] - native[: len(got)][done, k]).max() > 1e-2, m


def test_batched_passes_equal_single_passes(synth_root, test_cfg):
    """Passes batched into one padded forward (equal audio windows only) give the single-pass features."""
    from mirage.features.extract import Extractor, FeatureArrays, _batches

    assert _batches([5, 5, 5, 6, 6, 5], 2) == [[0, 1], [2], [3, 4], [5]]
    st = Release(synth_root).stimuli()["s01e01a"]
    got = {}
    for batch in (1, 8):
        ex = Extractor(test_cfg.features.model_copy(update={"pass_batch": batch}))
        plan = ex.plan(st.video, st.transcript)
        sink = FeatureArrays(plan.frames, ex.backbone.n_layers, ex.backbone.dim)
        ex.extract_passes(plan, 10, 34).write(sink)  # past the first audio window: batches of 8
        got[batch] = sink.arrays
    for m, single in got[1].items():
        assert np.abs(single).max() > 0, m
        np.testing.assert_allclose(got[8][m], single, atol=1e-4 * max(1.0, float(np.abs(single).max())), rtol=0)


def test_features_one_command_writes_each_modality(feature_store, synth_root, test_cfg, tmp_path, capsys):
    from safetensors.numpy import load_file

    st = Release(synth_root).stimuli()["s01e01a"]
    out = tmp_path / "one.safetensors"
    sets = sum([["--set", o] for o in _test_overrides(test_cfg)], [])
    code = cli_main(["features", "one", str(st.video), "--transcript", str(st.transcript), "--out", str(out), *sets])
    assert code == 0 and str(out) in capsys.readouterr().out
    got = load_file(str(out))
    assert sorted(got) == ["audio", "text", "vision"]
    stored = feature_store.read("s01e01a")
    frames = feature_store.modality_frames("s01e01a")
    for k, m in enumerate(("vision", "audio", "text")):
        assert got[m].dtype == np.float32 and got[m].shape == (frames[m], *stored.shape[2:])
        np.testing.assert_array_equal(got[m].astype(np.float16), stored[: frames[m], k])  # the store's numbers
    assert cli_main(["features", "one", str(tmp_path / "none.mkv"), "--out", str(out), *sets]) == 1
    assert "none.mkv" in capsys.readouterr().err
