"""Span files: an interrupted extraction keeps its spans, the re-run computes only the missing ones
(a corrupt or cut span is computed again) and the stored features equal an uninterrupted run's."""

from __future__ import annotations

import numpy as np
import pytest

from mirage.data.layout import Release
from mirage.features.extract import Extractor, extract_all, plan_items, span_key
from mirage.features.spans import assemble, existing_spans, write_span
from mirage.features.store import SPANS, open_store

SID = "s01e01a"


class _StopsAfter:
    """A real extractor interrupted (as by Ctrl-C) when it starts its ``n + 1``-th work item."""

    def __init__(self, inner: Extractor, n: int):
        self.inner, self.n, self.calls = inner, n, 0
        self.backbone = inner.backbone

    def extract_passes(self, plan, start, stop):
        self.calls += 1
        if self.calls > self.n:
            raise KeyboardInterrupt
        return self.inner.extract_passes(plan, start, stop)


@pytest.fixture
def cfg(test_cfg, synth_root, tmp_path):
    return test_cfg.with_overrides({"data.root": str(synth_root), "features.store": str(tmp_path / "store"),
                                    "features.cutoffs_per_item": 16})


def test_resume_computes_only_missing_and_corrupt_spans(cfg, tmp_path):
    st = Release(cfg.data.root).stimuli()[SID]
    plan, items = plan_items(SID, str(st.video), str(st.transcript), cfg.features)
    assert len(items) >= 5
    ex = Extractor(cfg.features)
    with pytest.raises(KeyboardInterrupt):
        extract_all(cfg, stimuli=[SID], extractor=_StopsAfter(ex, 4))
    store = open_store(cfg.features, must_exist=False)
    assert store is None or not store.has(SID)  # nothing committed
    key = span_key(plan, str(st.transcript), cfg.features)
    root = tmp_path / "store" / next(p.name for p in (tmp_path / "store").iterdir())
    kept = existing_spans(root, SID, key)
    assert sorted(kept) == [(it.start, it.stop) for it in items[:4]]
    flipped = root / kept[(items[0].start, items[0].stop)].rel
    raw = bytearray(flipped.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, other bytes: found when joined
    flipped.write_bytes(bytes(raw))
    cut = root / kept[(items[1].start, items[1].stop)].rel
    cut.write_bytes(cut.read_bytes()[:100])  # cut short: found by its size

    result = extract_all(cfg, stimuli=[SID], extractor=ex)
    assert result.ok and result.written == [SID]
    assert result.spans_reused == 2 and result.spans_computed == len(items) - 2
    assert not (root / SPANS).exists()  # committed: its spans are gone

    fresh = extract_all(cfg.with_overrides({"features.store": str(tmp_path / "fresh")}), stimuli=[SID], extractor=ex)
    assert fresh.spans_computed == len(items) and fresh.spans_reused == 0
    got = open_store(cfg.features).read(SID)
    want = open_store(cfg.features.model_copy(update={"store": str(tmp_path / "fresh")})).read(SID)
    np.testing.assert_array_equal(got, want)  # bit for bit


def test_spans_join_in_start_order_and_refuse_a_changed_file(tmp_path):
    """Word vectors add into shared text frames in span order (float32 sums depend on it); a span
    whose bytes changed is removed and reported, and nothing is built."""
    one = np.ones((2, 3), np.float32)
    big = float(2 ** 24)  # 2^24 + 1 is not a float32: the order of the sum shows

    def span(start, stop, text_bins, value):
        return write_span(tmp_path, "a", "k", start, stop, {
            "vision_frames": np.array([start // 2], np.int64), "vision": one[None] * (start + 1),
            "audio_frames": np.zeros(0, np.int64), "audio": np.zeros((0, 2, 3), np.float32),
            "text_bins": np.array(text_bins, np.int64).reshape(-1, 2), "text": (one * value)[None],
        })

    a, b, c = span(0, 2, [(0, 2)], 1.0), span(2, 4, [(1, 2)], big), span(4, 6, [(1, 2)], -big)
    frames = {"vision": 4, "audio": 0, "text": 3}
    out = assemble(tmp_path, "a", 4, frames, [c, b, a])  # handed over in any order
    assert not out.bad and not out.error
    arr = np.load(tmp_path / out.built.tmp)
    assert arr.shape == (4, 3, 2, 3) and arr.dtype == np.float16
    assert arr[:, 0, 0, 0].tolist() == [1.0, 3.0, 5.0, 0.0]  # vision set where given
    assert arr[:, 2, 0, 0].tolist() == [1.0, 0.0, 0.0, 0.0]  # frame 1: (1 + 2^24) - 2^24 = 0, not 1
    (tmp_path / out.built.tmp).unlink()

    path = tmp_path / a.rel
    raw = bytearray(path.read_bytes())
    raw[-30] ^= 1
    path.write_bytes(bytes(raw))
    out = assemble(tmp_path, "a", 4, frames, [a, b, c])
    assert [m.rel for m in out.bad] == [a.rel] and out.built is None and not path.exists()
    assert not list(tmp_path.glob("a.*tmp-*"))
    assert sorted(existing_spans(tmp_path, "a", "k")) == [(2, 4), (4, 6)]
