"""MediaReader: the frame shown at each time and 16 kHz mono audio, for any rate, size and channel count."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from test_data_release import write_movie

from mirage.data.media import MediaReader
from mirage.errors import DataError

FPS = Fraction(30000, 1001)


@pytest.fixture(scope="module")
def movie(tmp_path_factory):
    """12 s, 29.97 fps; stereo 44.1 kHz with a 440 Hz burst from 1 s to 2 s in the left channel only."""
    path = tmp_path_factory.mktemp("media") / "m.mkv"
    rate = 44100
    t = np.arange(12 * rate) / rate
    left = 0.5 * np.sin(2 * np.pi * 440 * t) * ((t >= 1.0) & (t < 2.0))
    write_movie(path, 12, fps=FPS, rate=rate, samples=np.stack([left, np.zeros_like(left)], axis=1))
    return path


def grey(t):
    return (8 * np.floor(np.asarray(t) * float(FPS) + 1e-9).astype(int)) % 256


def test_frames_at_picks_the_frame_shown(movie):
    times = np.array([0.0, 0.5 / float(FPS), 3 / float(FPS), 3.5 / float(FPS), 11.0, 0.7, 6.2, 6.2, 2.0])
    with MediaReader(movie) as m:
        assert m.duration == pytest.approx(12, abs=0.1)
        assert m.video_info.fps == pytest.approx(29.97, abs=1e-3)
        frames = m.frames_at(times)
    assert frames.shape == (len(times), 32, 48, 3) and frames.dtype == np.uint8
    np.testing.assert_allclose(frames.reshape(len(times), -1).mean(axis=1), grey(times), atol=3)


def test_frames_outside_the_file(movie):
    with MediaReader(movie) as m:
        first, last = m.frames_at([-1.0, 100.0])
        ref = m.frames_at([0.0, 11.99])
    np.testing.assert_array_equal(first, ref[0])
    np.testing.assert_array_equal(last, ref[1])


def test_audio_resampled_mono_aligned(movie):
    with MediaReader(movie) as m:
        assert (m.audio_info.sample_rate, m.audio_info.channels) == (44100, 2)
        a = m.audio(0.5, 2.5)
        lo = m.audio(0.5, 2.5, rate=8000)
    assert a.shape == (32000,) and a.dtype == np.float32 and lo.shape == (16000,)
    loud = np.nonzero(np.abs(a) > 0.05)[0]
    assert abs(loud[0] - 8000) <= 80 and abs(loud[-1] - 24000) <= 80  # burst at 1 s .. 2 s, within 5 ms
    assert np.abs(a).max() == pytest.approx(0.25, abs=0.02)  # left 0.5, right 0: channels averaged


def test_audio_zero_padding(movie):
    with MediaReader(movie) as m:
        before = m.audio(-2.0, 0.0)
        edge = m.audio(-1.0, 1.5)
        dur = m.duration
        after = m.audio(dur - 0.5, dur + 1.0)
    assert before.shape == (32000,) and not before.any()
    assert edge.shape == (40000,) and not edge[:16000].any() and np.abs(edge[32000:]).max() > 0.2
    assert after.shape == (24000,) and not after[8100:].any()


def test_no_audio_track(tmp_path):
    path = tmp_path / "silent.mkv"
    write_movie(path, 2, audio=False)
    with MediaReader(path) as m:
        assert m.has_video and not m.has_audio
        assert m.frames_at([0.5]).shape == (1, 32, 48, 3)
        with pytest.raises(DataError, match=r"silent\.mkv: no audio track"):
            m.audio(0, 1)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(DataError, match=r"nothere\.mkv: media file not found"):
        MediaReader(tmp_path / "nothere.mkv")
    bad = tmp_path / "bad.mkv"
    bad.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(DataError, match=r"bad\.mkv: not a decodable media file"):
        MediaReader(bad)


def test_frames_by_index_and_printed_duration(movie):
    idx = np.array([0, 3, 90, 300, 5000])
    with MediaReader(movie) as m:
        frames = m.frames_by_index(idx)
        assert m.printed_duration == pytest.approx(m._c.duration / 1e6, abs=0.005)
        assert round(m.printed_duration * 100) == m.printed_duration * 100  # 10 ms steps, as ffmpeg prints
        last = m.frames_at([100.0])[0]
    means = frames.reshape(len(idx), -1).mean(axis=1)
    np.testing.assert_allclose(means[:4], (8 * idx[:4]) % 256, atol=3)  # frame k shows grey level 8k
    np.testing.assert_array_equal(frames[-1], last)  # past the end: the last frame


def test_audio_track_is_int16_mono_resampled(movie):
    with MediaReader(movie) as m:
        track = m.audio_track(44100, 16000)
        again = m.audio_track(44100, 16000, duration=5.0)
        n44 = int(round(m.printed_duration * 44100))
    assert track.dtype == np.float32 and track.shape == (int(160 * n44 / 441),)
    np.testing.assert_allclose(again[:-200], track[: len(again) - 200], atol=1e-6)  # a cut changes only its edge
    assert again.shape == (int(160 * 5 * 44100 / 441),)
    loud = np.nonzero(np.abs(track) > 0.05)[0]
    assert abs(loud[0] - 16000) <= 80 and abs(loud[-1] - 32000) <= 80  # burst at 1 s .. 2 s
    assert np.abs(track).max() == pytest.approx(0.25, abs=0.02)  # left 0.5, right 0: channels averaged
    assert np.abs(track[:15000]).max() < 1e-6  # silence before the burst
