"""Truncated or corrupt movies: `mirage data check` and extraction name the file and the seconds missing.

Real mkv files of the synthetic dataset are cut with plain file operations: the Matroska header
keeps the full duration while the packets stop early.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
from test_data_release import write_movie

from mirage.cli import main
from mirage.data.check import check_dataset
from mirage.data.layout import Release
from mirage.data.media import MediaReader
from mirage.errors import DataError
from mirage.features.extract import Extractor, extract_all, plan_stimulus

TOLERANCE = 1.0  # features.media_tolerance_s in these tests
ENDS = re.compile(r"video data ends at ([\d.]+) s \(([\d.]+) s missing\).* of ([\d.]+) s")


def cut(path: Path, n_bytes: int) -> None:
    """Keep the first ``n_bytes`` of a file."""
    data = path.read_bytes()
    path.write_bytes(data[:n_bytes])


def declared_duration(path: Path) -> float:
    with av.open(str(path)) as c:
        return c.duration / av.time_base


@pytest.fixture
def ds(synth_root, tmp_path) -> Path:
    """A private copy of the synthetic test dataset to damage."""
    root = tmp_path / "ds"
    shutil.copytree(synth_root, root, ignore=shutil.ignore_patterns("_truth"))
    return root


@pytest.fixture
def movies(synth_root, tmp_path) -> tuple[Path, Path]:
    """(complete, cut at half its bytes) copies of one synthetic movie."""
    src = Release(synth_root).stimuli()["life01"].video
    whole, half = tmp_path / "whole.mkv", tmp_path / "half.mkv"
    shutil.copy(src, whole)
    shutil.copy(src, half)
    cut(half, half.stat().st_size // 2)
    return whole, half


def test_data_check_fails_on_a_movie_cut_to_5_kb_naming_the_missing_seconds(ds, capsys):
    video = Release(ds).stimuli()["life01"].video
    full = declared_duration(video)
    cut(video, 5 * 1024)
    assert main(["data", "check", str(ds), "--set", "data.n_parcels=32",
                 "--set", f"features.media_tolerance_s={TOLERANCE}"]) == 1
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if str(video) in ln)
    end, missing, declared = (float(x) for x in ENDS.search(line).groups())
    assert declared == pytest.approx(full, abs=0.01)  # the header still promises the whole movie
    assert end < 1.0 and end + missing == pytest.approx(full, abs=0.02)
    assert "audio data ends at" in line and "truncated or corrupt" in line


def test_data_check_records_where_complete_streams_end(synth_root, test_cfg):
    rep = check_dataset(synth_root, test_cfg.data, media_tolerance_s=TOLERANCE)
    assert rep["ok"], rep["errors"]
    for sid, facts in rep["stimuli"].items():
        assert set(facts["stream_ends"]) == {"video", "audio"}, sid
        for end in facts["stream_ends"].values():
            assert facts["duration"] - TOLERANCE <= end <= facts["duration"] + 1e-3, sid


def test_data_check_names_a_movie_with_a_corrupt_header(ds, test_cfg):
    video = Release(ds).stimuli()["s01e01a"].video
    video.write_bytes(np.random.default_rng(0).bytes(5000))
    rep = check_dataset(ds, test_cfg.data)
    assert not rep["ok"]
    assert any(e.startswith(f"{video}: not a decodable media file") for e in rep["errors"]), rep["errors"]


def test_check_complete_raises_only_beyond_the_tolerance(movies):
    whole, half = movies
    with MediaReader(whole) as m:
        ends = m.check_complete(TOLERANCE)
        assert max(ends.missing().values()) <= TOLERANCE  # the encoders' own gap is accepted
    with MediaReader(half) as m:
        ends = m.stream_ends()
        gap = max(ends.missing().values())
        assert 0.3 * ends.declared < gap < 0.7 * ends.declared  # half the bytes, about half the seconds
        m.check_complete(gap + 0.1)
        with pytest.raises(DataError, match=rf"half\.mkv: video data ends at {ends.ends['video']:.2f} s"):
            m.check_complete(TOLERANCE)


def test_frames_past_the_decodable_end_raise(movies):
    whole, half = movies
    with MediaReader(whole) as m:
        n = int(round(m.printed_duration * m.video_info.fps))
        last, past = m.frames_by_index([n - 1, n], past_end_s=TOLERANCE)  # one frame past: repeated, as the reference
        np.testing.assert_array_equal(last, past)
    with MediaReader(half) as m:
        end = m.stream_ends().ends["video"]
        fps = m.video_info.fps
        m.frames_by_index([int(end * fps) - 1], past_end_s=TOLERANCE)  # before the cut: decodes
        late = n - 1
        with pytest.raises(DataError, match=r"half\.mkv: video frame at [\d.]+ s requested .* s missing\)"):
            m.frames_by_index([0, late], past_end_s=TOLERANCE)
        frozen = m.frames_by_index([late])  # without a bound: the last decodable frame, for random access
        assert frozen.shape[0] == 1


def test_audio_track_refuses_padding_beyond_the_tolerance(movies):
    whole, half = movies
    with MediaReader(whole) as m:
        track = m.audio_track(44100, 16000, m.printed_duration, max_pad_s=TOLERANCE)
        assert len(track) == int(16000 * round(m.printed_duration * 44100) / 44100)
    with MediaReader(half) as m:
        with pytest.raises(DataError, match=r"half\.mkv: audio decodes to [\d.]+ s of [\d.]+ s \([\d.]+ s missing\)"):
            m.audio_track(44100, 16000, m.printed_duration, max_pad_s=TOLERANCE)


def test_extraction_stores_nothing_for_a_truncated_movie(ds, test_cfg, tmp_path):
    video = Release(ds).stimuli()["life01"].video
    cut(video, 5 * 1024)
    cfg = test_cfg.with_overrides({"data.root": str(ds), "features.store": str(tmp_path / "store"),
                                   "features.media_tolerance_s": TOLERANCE})
    result = extract_all(cfg, stimuli=["life01"])
    assert result.written == [] and list(result.failed) == ["life01"]
    assert str(video) in result.failed["life01"] and ENDS.search(result.failed["life01"])
    assert not list((tmp_path / "store").rglob("life01*"))


@pytest.fixture(scope="module")
def extractor(test_cfg) -> Extractor:
    """The tiny backbone's extractor, decoding with the test tolerance."""
    return Extractor(test_cfg.features.model_copy(update={"media_tolerance_s": TOLERANCE}))


@pytest.mark.parametrize("audio", [True, False], ids=["audio-cut", "video-cut"])
def test_extractor_refuses_a_movie_cut_after_planning(movies, tmp_path, test_cfg, extractor, audio):
    """A plan made before the cut (here: with no tolerance) meets decoders that raise instead of
    padding silence (audio) or freezing the last frame (video)."""
    movie = movies[1]
    if not audio:
        movie = tmp_path / "silent.mkv"
        write_movie(movie, 20, fps=10, audio=False)
        cut(movie, movie.stat().st_size // 2)
    plan = plan_stimulus(movie, None, test_cfg.features.model_copy(update={"media_tolerance_s": 1e6}))
    n = len(plan.passes)
    kind = "audio decodes to" if audio else "video frame at"
    with pytest.raises(DataError, match=rf"{movie.name}: {kind} .*s missing\), the file is truncated or corrupt"):
        extractor.extract_passes(plan, n - 2, n)
