"""The feature store: key, atomic writes, manifest checks, memory-mapped reads."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mirage.config import load_config
from mirage.errors import FeatureStoreError
from mirage.features.store import FeatureStore, StoreWriter, open_store, store_key


@pytest.fixture
def fcfg(tmp_path):
    return load_config("demo", [f"features.store={tmp_path / 'store'}"]).features


def _feats(n=10, layers=5, dim=8, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, layers, dim)).astype(np.float16)


def test_key_changes_with_every_extraction_parameter(fcfg):
    base = store_key(fcfg)
    for change in ({"video_seconds": 3.0}, {"rate_hz": 1.0}, {"max_words": 10}, {"revision": "x"},
                   {"fusion": "posthoc"}, {"model_id": "other"}, {"audio_seconds": 2.0}, {"max_frames": 2},
                   {"audio_decode_rate": 48000}, {"transcript_tr": 1.0}, {"video_max_pixels": 8192}):
        assert store_key(fcfg.model_copy(update=change)) != base, change
    tiny = fcfg.tiny.model_copy(update={"seed": 1})
    assert store_key(fcfg.model_copy(update={"tiny": tiny})) != base
    # how the work is run does not change the numbers, nor the key
    for same in ({"actors": 4}, {"cutoffs_per_item": 7}, {"torch_threads": 3}, {"store": "/elsewhere"}):
        assert store_key(fcfg.model_copy(update=same)) == base, same


def test_write_read_roundtrip_is_memmapped(fcfg):
    w = StoreWriter(fcfg)
    x = _feats()
    w.write("s01e01a", x)
    store = open_store(fcfg)
    assert store.key == store_key(fcfg) and store.stimuli() == ["s01e01a"] and store.has("s01e01a")
    arr = store.read("s01e01a")
    assert isinstance(arr, np.memmap) and arr.dtype == np.float16 and arr.shape == (10, 3, 5, 8)
    np.testing.assert_array_equal(arr, x)
    assert (store.n_layers, store.dim, store.rate_hz) == (5, 8, fcfg.rate_hz)
    m = store.manifest
    assert m["stimuli"]["s01e01a"]["shape"] == [10, 3, 5, 8] and len(m["stimuli"]["s01e01a"]["sha256"]) == 64
    assert m["modalities"] == ["vision", "audio", "text"] and m["libraries"]["torch"] != "absent"
    assert m["backbone"] == "tiny" and m["revision"] == fcfg.revision
    assert store.verify() == {}


def test_read_window_zero_pads_outside_the_run(fcfg):
    w = StoreWriter(fcfg)
    x = _feats()
    w.write("a", x)
    store = FeatureStore(w.root)
    win = store.read_window("a", -3, 4)
    assert win.shape == (7, 3, 5, 8)
    assert not win[:3].any()
    np.testing.assert_array_equal(win[3:], x[:4])
    tail = store.read_window("a", 8, 12, layers=[0, 4])
    np.testing.assert_array_equal(tail[:2], x[8:10][:, :, [0, 4]])
    assert not tail[2:].any() and tail.shape == (4, 3, 2, 8)


def test_verify_catches_corruption_and_missing_files(fcfg):
    w = StoreWriter(fcfg)
    w.write("a", _feats())
    w.write("b", _feats(seed=1))
    store = FeatureStore(w.root)
    raw = bytearray(store.path("a").read_bytes())
    raw[-1] ^= 0xFF
    store.path("a").write_bytes(bytes(raw))
    store.path("b").unlink()
    problems = store.verify()
    assert "checksum" in problems["a"] and "missing" in problems["b"]


def test_partial_files_are_never_counted_and_get_cleaned(fcfg):
    w = StoreWriter(fcfg)
    w.write("a", _feats())
    partial = w.root / "b.npy.tmp-12345"
    partial.write_bytes(b"half")
    orphan = w.root / "c.npy"  # renamed but not yet in the manifest (killed between the two steps)
    np.save(orphan, _feats(seed=2))
    store = FeatureStore(w.root)
    assert store.stimuli() == ["a"] and not store.has("c")
    assert "leftover" in store.verify()["b.npy.tmp-12345"]
    with pytest.raises(FeatureStoreError, match="another extraction"):
        StoreWriter(fcfg)  # one writer at a time
    w.close()
    w2 = StoreWriter(fcfg)  # a new run cleans partial files and recomputes the orphan
    assert not partial.exists() and not w2.has("c")


def test_other_parameters_never_reused(fcfg):
    StoreWriter(fcfg).write("a", _feats())
    other = fcfg.model_copy(update={"video_seconds": 3.0})
    with pytest.raises(FeatureStoreError, match="no feature store"):
        open_store(other)
    assert open_store(other, must_exist=False) is None
    # a manifest in the right place but with other parameters is refused, naming the field
    path = open_store(fcfg).root / "manifest.json"
    m = json.loads(path.read_text())
    m["params"]["max_words"] = 3
    path.write_text(json.dumps(m))
    with pytest.raises(FeatureStoreError, match="max_words"):
        open_store(fcfg)
    with pytest.raises(FeatureStoreError, match="max_words"):
        StoreWriter(fcfg)


def test_bad_arrays_are_refused(fcfg):
    w = StoreWriter(fcfg)
    with pytest.raises(FeatureStoreError, match="n_frames, 3"):
        w.write("a", np.zeros((4, 2, 5, 8), np.float16))
    bad = _feats()
    bad[0, 0, 0, 0] = np.inf
    with pytest.raises(FeatureStoreError, match="NaN or inf"):
        w.write("a", bad)
    w.write("a", _feats())
    with pytest.raises(FeatureStoreError, match="n_layers"):
        w.write("b", _feats(layers=3))
    assert FeatureStore(w.root).stimuli() == ["a"]
    with pytest.raises(FeatureStoreError, match="not in the store"):
        FeatureStore(w.root).read("zzz")


def test_overwrite_keeps_the_old_entry_until_the_new_one_commits(fcfg):
    w = StoreWriter(fcfg)
    old, new = _feats(seed=0), _feats(n=12, seed=1)
    w.write("a", old)
    part = w.begin("a", new.shape)
    part.put(0, new)
    during = FeatureStore(w.root)  # a reader while the new version is being written
    assert during.stimuli() == ["a"] and during.n_frames("a") == 10
    np.testing.assert_array_equal(during.read("a"), old)
    part.abort()  # a recomputation that fails leaves the old entry as it was
    assert FeatureStore(w.root).verify() == {}
    np.testing.assert_array_equal(FeatureStore(w.root).read("a"), old)
    part = w.begin("a", new.shape)
    part.put(0, new)
    part.commit()
    after = FeatureStore(w.root)
    assert after.verify() == {} and after.n_frames("a") == 12 and "replacing" not in after.manifest
    np.testing.assert_array_equal(after.read("a"), new)
    np.testing.assert_array_equal(during.read("a"), old)  # an open map keeps the file it opened


def test_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(FeatureStoreError, match="manifest.json"):
        FeatureStore(tmp_path)


def test_store_pickles_without_its_mapped_data(fcfg):
    import pickle

    w = StoreWriter(fcfg)
    w.write("a", _feats(n=2000))
    store = FeatureStore(w.root)
    store.read("a")
    blob = pickle.dumps(store)
    assert len(blob) < 20_000  # the 2000-frame array is not in the pickle
    np.testing.assert_array_equal(pickle.loads(blob).read("a"), store.read("a"))


def _reference_window(x: np.ndarray, start_s: float, duration_s: float, hz: float = 2.0) -> np.ndarray:
    """The reference's per-modality training slice: rows round(start * hz) on, zero outside its own frames."""
    n_out = max(1, int(round(duration_s * hz)))
    out = np.zeros((n_out, *x.shape[1:]), x.dtype)
    i0 = int(round(start_s * hz))
    lo, hi = max(0, i0), min(len(x), i0 + n_out)
    if hi > lo:
        out[lo - i0: hi - i0] = x[lo:hi]
    return out


def test_modalities_keep_their_own_frame_counts(fcfg):
    """One array of max(counts) rows, zero past each modality's count: windows sliced by time equal the
    reference's per-modality slices."""
    rng = np.random.default_rng(3)
    frames = {"vision": 30, "audio": 29, "text": 33}
    per = {m: rng.standard_normal((n, 5, 8)).astype(np.float16) for m, n in frames.items()}
    w = StoreWriter(fcfg)
    part = w.begin("a", (33, 3, 5, 8), frames)
    for k, m in enumerate(("vision", "audio", "text")):
        for i in range(frames[m]):
            part.set(k, i, per[m][i])
    with pytest.raises(FeatureStoreError, match="audio frames \\[29, 30\\)"):
        part.set(1, 29, per["audio"][0])  # past audio's own count
    part.commit()
    store = FeatureStore(w.root)
    assert store.modality_frames("a") == frames and store.n_frames("a") == 33 and store.verify() == {}
    for start_s, dur_s in ((-4.47, 10.0), (0.0, 16.5), (10.5, 8.0), (14.0, 3.0)):
        i0 = int(round(start_s * 2))
        win = store.read_window("a", i0, i0 + int(round(dur_s * 2)))
        for k, m in enumerate(("vision", "audio", "text")):
            np.testing.assert_array_equal(win[:, k], _reference_window(per[m], start_s, dur_s), err_msg=f"{m} {start_s}")


def test_word_vectors_add_up_and_overflow_is_refused(fcfg):
    w = StoreWriter(fcfg)
    part = w.begin("a", (4, 3, 5, 8), {"vision": 4, "audio": 4, "text": 3})
    one = np.ones((5, 8), np.float32)
    part.add(2, 0, 2, one)
    part.add(2, 1, 3, 2 * one)  # two words in frame 1: their sum
    part.commit()
    text = FeatureStore(w.root).read("a")[:, 2, 0, 0].tolist()
    assert text == [1.0, 3.0, 2.0, 0.0]
    part = w.begin("b", (4, 3, 5, 8))
    part.set(0, 0, np.full((5, 8), 7e4, np.float32))
    with pytest.raises(FeatureStoreError, match="overflow float16"):
        part.commit()
    assert not FeatureStore(w.root).has("b") and not list(w.root.glob("*.tmp-*"))
    with pytest.raises(FeatureStoreError, match="frame counts"):
        w.begin("c", (4, 3, 5, 8), {"vision": 5})
