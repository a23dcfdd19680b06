"""What each extraction pass sees: cutoff times, video frame times, audio spans, transcript words.

Feature frame ``i`` of a stimulus is the pass whose cutoff is at ``(i + 1) / rate_hz`` seconds.
All windows end at the cutoff: the last ``video_seconds`` of video sampled at ``video_fps`` (at
most ``max_frames`` frames, an even number: the vision encoder groups frames in pairs), the last
``audio_seconds`` of audio, and the last ``max_words`` words that ended at or before the cutoff.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mirage.config import FeaturesConfig

_EPS = 1e-6


def n_frames_for(duration_s: float, rate_hz: float) -> int:
    """Feature frames of a stimulus (the data layer's rule, so windows and features agree)."""
    from mirage.data.windows import n_feature_frames

    return n_feature_frames(duration_s, rate_hz)


def cutoff_times(frames: np.ndarray, rate_hz: float) -> np.ndarray:
    """Cutoff time in seconds of each feature frame index. (n,) -> (n,)."""
    return (np.asarray(frames, dtype=np.float64) + 1.0) / rate_hz


def n_video_frames(cfg: FeaturesConfig) -> int:
    """Video frames per pass: video_seconds * video_fps, at most max_frames, even and at least 2."""
    n = min(cfg.max_frames, max(1, int(round(cfg.video_seconds * cfg.video_fps))))
    return max(2, n - n % 2)


def video_frame_times(cutoffs: np.ndarray, cfg: FeaturesConfig, duration_s: float) -> np.ndarray:
    """Times of the frames shown just before each cutoff. (n,) -> (n, n_video_frames), oldest first.

    Times before the movie start clip to 0 (the first frame), past its end to the last frame.
    """
    k = n_video_frames(cfg)
    back = (k - 1 - np.arange(k)) / cfg.video_fps  # (k,) seconds before the cutoff
    t = np.asarray(cutoffs, dtype=np.float64)[:, None] - back[None, :] - 1e-3  # (n, k)
    return np.clip(t, 0.0, max(duration_s - 1e-3, 0.0))


@dataclass(frozen=True)
class WordSpan:
    """A transcript word: text and the second at which it ends (onset is not needed here)."""

    text: str
    offset: float


def words_before(words: list[WordSpan], cutoff: float, max_words: int) -> list[WordSpan]:
    """The last ``max_words`` words (in order) that ended at or before ``cutoff``."""
    if max_words <= 0:
        return []
    done = [w for w in words if w.offset <= cutoff + _EPS]
    return done[-max_words:]


def word_frame(offset: float, rate_hz: float) -> int:
    """Feature frame a word belongs to: the first cutoff at or after its end."""
    return max(int(math.ceil(offset * rate_hz - _EPS)) - 1, 0)
