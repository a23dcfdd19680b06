"""Overwriting and failing extractions keep the store whole: each stimulus is replaced at commit,
a swap cut short is settled from the file's checksum, and a failed run leaves no empty store."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from mirage.cli import main as cli_main
from mirage.config import MODALITIES, load_config
from mirage.data.layout import Release
from mirage.features.extract import Extractor, extract_all, plan_stimulus
from mirage.features.store import FeatureStore, StoreWriter, open_store, store_path

SUBSET = ["chaplin1", "life01", "s01e01a"]  # sorted: the order the in-process runner takes


@pytest.fixture
def dataset_copy(synth_root, tmp_path) -> Path:
    """The test dataset copied, so a test may damage it."""
    root = tmp_path / "data"
    shutil.copytree(synth_root, root, ignore=shutil.ignore_patterns("_truth"))
    return root


def _planted_store(cfg, stimuli) -> dict[str, np.ndarray]:
    """Store 'old' features (a constant per stimulus) of the right shapes; returns them."""
    f = cfg.features
    found = Release(cfg.data.root).stimuli()
    old = {}
    with StoreWriter(f) as w:
        for k, sid in enumerate(stimuli):
            plan = plan_stimulus(found[sid].video, found[sid].transcript, f)
            shape = (plan.n_frames, len(MODALITIES), f.tiny.n_layers + 1, f.tiny.hidden)
            old[sid] = np.full(shape, 0.25 * (k + 1), np.float16)
            w.write(sid, old[sid], plan.frames)
    return old


class _StopsAt:
    """A real extractor that is interrupted (as by Ctrl-C) when it reaches one movie."""

    def __init__(self, inner: Extractor, video: Path):
        self.inner, self.video = inner, str(video)
        self.backbone = inner.backbone

    def extract_passes(self, plan, start, stop):
        if str(plan.video) == self.video:
            raise KeyboardInterrupt
        return self.inner.extract_passes(plan, start, stop)


def test_overwrite_interrupted_midway_keeps_every_stimulus_not_yet_recomputed(dataset_copy, test_cfg, tmp_path):
    cfg = test_cfg.with_overrides({"data.root": str(dataset_copy), "features.store": str(tmp_path / "store")})
    old = _planted_store(cfg, SUBSET)
    stop_video = Release(dataset_copy).stimuli()["life01"].video
    with pytest.raises(KeyboardInterrupt):
        extract_all(cfg, stimuli=SUBSET, overwrite=True, extractor=_StopsAt(Extractor(cfg.features), stop_video))
    store = open_store(cfg.features)
    assert store.stimuli() == SUBSET and store.verify() == {}
    assert not list(store.root.glob("*.tmp-*"))
    recomputed = np.asarray(store.read("chaplin1"))
    assert recomputed.shape == old["chaplin1"].shape and not np.array_equal(recomputed, old["chaplin1"])
    for sid in ("life01", "s01e01a"):  # the one being computed and the one after it: as they were
        np.testing.assert_array_equal(store.read(sid), old[sid])


def test_overwrite_cli_keeps_the_old_features_of_a_stimulus_that_fails(dataset_copy, test_cfg, tmp_path, capsys):
    from conftest import TEST_OVERRIDES

    store_dir = tmp_path / "store"
    cfg = test_cfg.with_overrides({"data.root": str(dataset_copy), "features.store": str(store_dir)})
    old = _planted_store(cfg, ["chaplin1", "life01"])
    bad = Release(dataset_copy).stimuli()["life01"].video
    raw = bad.read_bytes()
    bad.write_bytes(raw[:200] + bytes(len(raw) - 200))  # header kept, every packet zeroed
    sets = [f"data.root={dataset_copy}", f"features.store={store_dir}", *TEST_OVERRIDES, f"outputs={test_cfg.outputs}"]
    code = cli_main(["extract", "--local", "--overwrite", "--stimuli", "chaplin1", "life01",
                     *sum([["--set", o] for o in sets], [])])
    out = capsys.readouterr()
    assert code == 1
    assert "stimulus life01 failed" in out.err and "previously stored features are kept" in out.err
    assert "1 written, 0 already stored, 1 failed" in out.out
    store = open_store(cfg.features)
    assert store.stimuli() == ["chaplin1", "life01"] and store.verify() == {}
    np.testing.assert_array_equal(store.read("life01"), old["life01"])
    assert not np.array_equal(store.read("chaplin1"), old["chaplin1"])


def test_distributed_plan_with_overwrite_removes_nothing(synth_root, test_cfg, tmp_path):
    from mirage.distributed.extract import plan
    from mirage.features.extract import ExtractResult

    cfg = test_cfg.with_overrides({"data.root": str(synth_root), "features.store": str(tmp_path / "store")})
    old = _planted_store(cfg, SUBSET)
    with StoreWriter(cfg.features) as w:
        result = ExtractResult(store=w.root)
        items, plans = plan(cfg, w, True, result, SUBSET)
        assert sorted(plans) == SUBSET and {it.stimulus_id for it in items} == set(SUBSET) and not result.skipped
        store = FeatureStore(w.root)  # planned, nothing computed yet: every stimulus still readable
        assert store.stimuli() == SUBSET and store.verify() == {}
        for sid in SUBSET:
            np.testing.assert_array_equal(store.read(sid), old[sid])


@pytest.fixture
def fcfg(tmp_path):
    return load_config("demo", [f"features.store={tmp_path / 'store'}"]).features


def _feats(n, seed):
    return np.random.default_rng(seed).standard_normal((n, 3, 5, 8)).astype(np.float16)


@pytest.mark.parametrize("crash_at, survivor", [(2, "old"), (3, "new")])
def test_swap_cut_short_is_settled_by_the_next_writer(fcfg, monkeypatch, crash_at, survivor):
    """A crash before the rename keeps the old version, after it the new one; never a mismatch."""
    w = StoreWriter(fcfg)
    versions = {"old": _feats(10, 0), "new": _feats(12, 1)}
    w.write("a", versions["old"])
    w.write("b", _feats(4, 2))
    real_replace, calls = os.replace, []

    def replace(src, dst):  # 1: manifest naming the swap, 2: the swap, 3: manifest recording it
        calls.append(dst)
        if len(calls) == crash_at:
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        w.write("a", versions["new"])
    monkeypatch.undo()
    w.close()
    cut = FeatureStore(w.root)
    assert "replacing" in cut.manifest and "cut short" in cut.verify()["a"]
    settled = StoreWriter(fcfg)
    settled.close()
    store = FeatureStore(w.root)
    assert "replacing" not in store.manifest and store.stimuli() == ["a", "b"]
    assert store.verify() == {} and not list(store.root.glob("*.tmp-*"))
    np.testing.assert_array_equal(store.read("a"), versions[survivor])


def test_failed_extraction_leaves_no_empty_store(synth_root, test_cfg, tmp_path, capsys):
    from conftest import TEST_OVERRIDES

    parent = tmp_path / "features"
    sets = [f"data.root={synth_root}", f"features.store={parent}", *TEST_OVERRIDES, f"outputs={test_cfg.outputs}"]
    code = cli_main(["extract", "--local", "--stimuli", "nosuch01", *sum([["--set", o] for o in sets], [])])
    assert code == 1 and "nosuch01" in capsys.readouterr().err
    assert not parent.exists()  # the store and the folder made for it are gone
    parent.mkdir()
    (parent / "keep.txt").write_text("not the writer's")
    cfg = test_cfg.with_overrides({"data.root": str(synth_root), "features.store": str(parent)})
    with pytest.raises(Exception, match="nosuch01"):
        extract_all(cfg, stimuli=["nosuch01"])
    assert sorted(p.name for p in parent.iterdir()) == ["keep.txt"]  # what it did not create stays


def test_writer_that_commits_nothing_keeps_a_store_it_did_not_create(fcfg):
    StoreWriter(fcfg).write("a", _feats(3, 0))
    root = store_path(fcfg)
    with StoreWriter(fcfg):
        pass
    assert FeatureStore(root).stimuli() == ["a"]
    with StoreWriter(fcfg.model_copy(update={"video_seconds": 3.0})) as other:
        made = other.root
        assert (made / "manifest.json").is_file()
    assert not made.exists() and root.is_dir()


def test_verify_fails_on_an_empty_store(fcfg, tmp_path, capsys):
    w = StoreWriter(fcfg)
    w.write("a", _feats(3, 0))
    w.close()
    manifest = w.root / "manifest.json"  # emptied as the former --overwrite left it
    m = json.loads(manifest.read_text())
    m["stimuli"] = {}
    manifest.write_text(json.dumps(m))
    (w.root / "a.npy").unlink()
    code = cli_main(["features", "verify", "--set", f"features.store={tmp_path / 'store'}"])
    out = capsys.readouterr()
    assert code == 1
    assert f"mirage: error: {manifest}: the store holds no stimulus" in out.err
    assert "0 stimuli, 1 problems" in out.out
