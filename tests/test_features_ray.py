"""The Ray Data extraction pipeline: same features as in-process, survives a killed actor, isolates bad movies."""

from __future__ import annotations

import os
import shutil
import signal
import threading
from pathlib import Path

import numpy as np
import pytest

from mirage.data.layout import Release
from mirage.features.store import open_store

pytestmark = pytest.mark.slow

STIMULI = ["chaplin2", "pulpfiction1", "s07e01b", "life01"]


@pytest.fixture(scope="module")
def ray_session(test_cfg):
    import ray

    from mirage.distributed.cluster import init_ray

    init_ray(test_cfg.ray)
    try:
        yield ray
    finally:
        ray.shutdown()


def _extract_actors(ray) -> list:
    from ray.util.state import list_actors

    address = ray.get_runtime_context().gcs_address  # other Ray instances may run on this machine
    return [a for a in list_actors(address=address, limit=1000) if "ExtractActor" in (a.class_name or "") and a.state == "ALIVE"]


def test_pipeline_matches_in_process_and_survives_a_killed_actor(ray_session, feature_store, synth_root, test_cfg,
                                                                 tmp_path):
    from mirage.distributed.extract import run_extract

    cfg = test_cfg.with_overrides({"data.root": str(synth_root), "features.store": str(tmp_path / "store"),
                                   "features.cutoffs_per_item": 10, "features.actors": 1})
    killed: list[int] = []
    first_stored = threading.Event()

    def killer():
        if not first_stored.wait(timeout=240):
            return
        for actor in _extract_actors(ray_session):
            if actor.pid:
                os.kill(actor.pid, signal.SIGKILL)
                killed.append(actor.pid)
                return

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    messages: list[str] = []

    def progress(msg: str) -> None:
        messages.append(msg)
        if msg.startswith("stored"):
            first_stored.set()

    result = run_extract(cfg, stimuli=STIMULI, progress=progress)
    thread.join(timeout=30)
    assert killed, "no extraction actor was found to kill"
    assert result.ok and sorted(result.written) == sorted(STIMULI), result.failed
    assert any(m.startswith("stored") for m in messages) and len(messages) >= 1 + len(STIMULI)
    store = open_store(cfg.features)
    assert store.stimuli() == sorted(STIMULI) and store.verify() == {}
    for sid in STIMULI:  # the spans the dead actor held were redone: same as the in-process store
        # (other span lengths batch the passes differently: equal up to float16 rounding)
        np.testing.assert_allclose(store.read(sid), feature_store.read(sid), rtol=1e-2, atol=1e-3)
    alive = _extract_actors(ray_session)
    assert all(a.pid not in killed for a in alive)

    again = run_extract(cfg, stimuli=STIMULI)
    assert again.written == [] and sorted(again.skipped) == sorted(STIMULI)


def test_pipeline_isolates_an_undecodable_movie(ray_session, synth_root, test_cfg, tmp_path):
    from mirage.distributed.extract import run_extract

    root = tmp_path / "data"
    shutil.copytree(Path(synth_root) / "stimuli", root / "stimuli")
    bad = Release(root).stimuli()["s07e01b"].video
    raw = bad.read_bytes()
    half = len(raw) // 2
    bad.write_bytes(raw[:half] + os.urandom(len(raw) - half))  # decodes partly, then garbage
    cfg = test_cfg.with_overrides({"data.root": str(root), "features.store": str(tmp_path / "store")})
    result = run_extract(cfg, stimuli=["chaplin2", "s07e01b"])
    assert "s07e01b" in result.failed and str(bad) in result.failed["s07e01b"]
    assert result.written == ["chaplin2"]
    store = open_store(cfg.features)
    assert store.stimuli() == ["chaplin2"] and not list(store.root.glob("s07e01b*"))


def test_actors_write_spans_the_driver_gets_metadata_and_a_rerun_reuses_spans(ray_session, feature_store, synth_root,
                                                                                test_cfg, tmp_path):
    from mirage.distributed.extract import run_extract
    from mirage.features.extract import Extractor, plan_items, span_key
    from mirage.features.spans import write_span
    from mirage.features.store import SPANS, store_path

    cfg = test_cfg.with_overrides({"data.root": str(synth_root), "features.store": str(tmp_path / "store")})
    stimuli = ["chaplin2", "s01e01a"]
    found = Release(synth_root).stimuli()
    planned = {s: plan_items(s, str(found[s].video), str(found[s].transcript) if found[s].transcript else None,
                             cfg.features) for s in stimuli}
    n_items = sum(len(items) for _, items in planned.values())
    plan, items = planned["s01e01a"]
    assert len(items) >= 2
    ex = Extractor(cfg.features)  # an earlier, interrupted run left two spans on disk, the second damaged since
    root = store_path(cfg.features)
    key = span_key(plan, str(found["s01e01a"].transcript), cfg.features)
    kept = [write_span(root, "s01e01a", key, it.start, it.stop, ex.extract_passes(plan, it.start, it.stop).to_arrays(
        ex.backbone.n_layers, ex.backbone.dim)) for it in items[:2]]
    damaged = root / kept[1].rel
    raw = bytearray(damaged.read_bytes())
    raw[-100] ^= 0xFF
    damaged.write_bytes(bytes(raw))

    messages: list[str] = []
    result = run_extract(cfg, stimuli=stimuli, progress=messages.append)
    assert result.ok and sorted(result.written) == stimuli, result.failed
    assert any("1 corrupt span(s) removed" in m for m in messages), messages
    assert result.spans_reused == 1 and result.spans_computed == n_items - 1 == result.driver_rows
    store = open_store(cfg.features)
    feature_bytes = sum(store.path(s).stat().st_size for s in stimuli)
    assert 0 < result.driver_bytes / result.driver_rows < 1024  # metadata only
    assert result.driver_bytes < feature_bytes / 10
    assert store.verify() == {} and not (root / SPANS).exists()
    for sid in stimuli:  # same spans, joined in the same order: the in-process features, bit for bit
        np.testing.assert_array_equal(store.read(sid), feature_store.read(sid))
