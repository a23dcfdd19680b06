"""What each extraction pass sees: the pass plan, the windows at a cutoff, the read-out rules.

These are the reference extractor's semantics (``conformance/features_tiny/README.md``), as pure
functions of the transcript, the media durations and ``FeaturesConfig``:

- frames: a modality of duration D has ``max(1, round(rate * D))`` frames; audio and vision frame
  ``k`` is read at the cutoff ``min(D, (k + 1) / rate)``; text's D is the transcript's length.
- passes: one per distinct cutoff, the union of the audio, vision and word-end cutoffs with keys
  rounded to 1e-6 (a word's end wins a tie), in ascending order.
- windows at cutoff c: the last ``max_words`` words that ended by c; audio samples
  ``[floor(max(0, c - audio_seconds) * sr), ceil(c * sr))``; video frames every ``1 / video_fps``
  from ``max(0, c - video_seconds)`` (float32 times), the last ``max_frames`` kept.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mirage.config import FeaturesConfig
from mirage.data.transcripts import read_rows

CUTOFF_DECIMALS = 6
"""Cutoffs closer than this many decimals are one pass."""


@dataclass(frozen=True)
class Word:
    """A transcript word: its index in the transcript, text, onset and end (onset + duration) in seconds."""

    index: int
    text: str
    onset: float
    end: float


@dataclass(frozen=True)
class Transcript:
    """The words of a transcript in file order, and its duration (rows x TR, or the last word's end)."""

    words: tuple[Word, ...]
    duration: float

    @property
    def ends(self) -> list[float]:
        """End of every word, in file order."""
        return [w.end for w in self.words]


def read_transcript(path: str | Path | None, row_seconds: float) -> Transcript | None:
    """Words and duration of an Algonauts transcript (None for no file)."""
    if path is None:
        return None
    rows = read_rows(path)
    words = tuple(
        Word(i, str(w.text), float(w.onset), float(w.offset))
        for i, w in enumerate(w for row in rows for w in row)
    )
    duration = max([len(rows) * row_seconds] + [w.end for w in words])
    return Transcript(words, float(duration))


def n_frames(duration_s: float, rate_hz: float) -> int:
    """Frames of a modality lasting ``duration_s``: ``max(1, round(rate * duration))`` (half to even)."""
    return max(1, int(round(float(duration_s) * rate_hz)))


def frame_cutoffs(duration_s: float, rate_hz: float) -> list[float]:
    """Cutoff of every frame of a media modality: ``min(D, (k + 1) / rate)``."""
    return [min(float(duration_s), float(k + 1) / rate_hz) for k in range(n_frames(duration_s, rate_hz))]


@dataclass
class Pass:
    """One backbone pass: its cutoff and what it serves (word indices, audio and vision frame)."""

    cutoff: float
    words: list[int] = field(default_factory=list)
    audio_frame: int | None = None
    vision_frame: int | None = None


def pass_plan(
    transcript: Transcript | None, audio_s: float | None, vision_s: float, rate_hz: float
) -> list[Pass]:
    """Every pass of a stimulus in ascending cutoff order.

    Args:
        transcript: the words (None: no text passes); audio_s: audio duration (None: no audio
        track); vision_s: video duration; rate_hz: frame rate of the features.
    """
    plan: dict[float, Pass] = {}
    for w in transcript.words if transcript else ():
        plan.setdefault(round(w.end, CUTOFF_DECIMALS), Pass(w.end)).words.append(w.index)
    if audio_s is not None:
        for k, c in enumerate(frame_cutoffs(audio_s, rate_hz)):
            plan.setdefault(round(c, CUTOFF_DECIMALS), Pass(c)).audio_frame = k
    for k, c in enumerate(frame_cutoffs(vision_s, rate_hz)):
        plan.setdefault(round(c, CUTOFF_DECIMALS), Pass(c)).vision_frame = k
    return [plan[k] for k in sorted(plan)]


@dataclass(frozen=True)
class TextWindow:
    """The transcript window of a pass: its text, first word index and each word's character span."""

    text: str
    first_word: int
    spans: tuple[tuple[int, int], ...]

    def span_of(self, word_index: int) -> tuple[int, int] | None:
        """Character span of a transcript word inside the window text (None if outside)."""
        i = word_index - self.first_word
        return self.spans[i] if 0 <= i < len(self.spans) else None


def text_window(transcript: Transcript | None, cutoff: float, max_words: int) -> TextWindow:
    """The last ``max(1, max_words)`` words with end <= cutoff (``bisect_right``), joined by spaces."""
    if transcript is None or not transcript.words:
        return TextWindow("", 0, ())
    stop = bisect.bisect_right(transcript.ends, float(cutoff))
    first = max(0, stop - max(1, max_words))
    texts = [w.text for w in transcript.words[first:stop]]
    spans, cursor = [], 0
    for t in texts:
        spans.append((cursor, cursor + len(t)))
        cursor += len(t) + 1
    return TextWindow(" ".join(texts), first, tuple(spans))


def audio_range(cutoff: float, cfg: FeaturesConfig, n_samples: int) -> tuple[int, int]:
    """Sample range [start, stop) of the audio window at a cutoff, clipped to the signal, >= 1 sample."""
    sr = float(cfg.audio_rate)
    start = int(np.floor(max(0.0, float(cutoff) - max(0.0, cfg.audio_seconds)) * sr))
    stop = int(np.ceil(max(0.0, float(cutoff)) * sr))
    start = max(0, min(n_samples, start))
    return start, max(start + 1, min(n_samples, stop))


def video_times(cutoff: float, cfg: FeaturesConfig, duration_s: float) -> np.ndarray:
    """Times (float32, seconds) of the video frames of the window at a cutoff, oldest first.

    ``max(1, ceil((min(c, D) - start) * fps))`` frames from ``start = max(0, c - video_seconds)``,
    ``start + j / fps`` computed in float32; only the last ``max_frames`` are kept.
    """
    start = max(0.0, float(cutoff) - max(0.0, cfg.video_seconds))
    stop = min(max(start, float(cutoff)), float(duration_s))
    n = max(1, int(np.ceil(max(stop - start, 0.0) * cfg.video_fps)))
    times = start + np.arange(n, dtype=np.float32) / np.float32(cfg.video_fps)  # (n,) float32
    return times[-cfg.max_frames:]


def frame_indices(times: np.ndarray, duration_s: float, fps: float) -> np.ndarray:
    """Stream frame number shown at each time: ``int(fps * t + 1e-5)``, t clipped to [0, D).

    times: (n,) -> (n,) int64.
    """
    top = max(0.0, float(np.nextafter(float(duration_s), 0.0)))
    return np.array([int(fps * max(0.0, min(top, float(t))) + 1e-5) for t in times], dtype=np.int64)


def audio_readout_rank(n_tokens: int, window_samples: int, cfg: FeaturesConfig) -> int:
    """Rank among the audio tokens read out: the last of ``n = max(1, round(rate * seconds))`` nearest-
    neighbour samples of the ``n_tokens`` states, i.e. ``floor((n - 1) * N / n)`` in float32 as torch does."""
    import torch

    n = max(1, int(round(window_samples / float(cfg.audio_rate) * cfg.rate_hz)))
    ranks = torch.arange(n_tokens, dtype=torch.float32)[None, None]  # (1, 1, N)
    picked = torch.nn.functional.interpolate(ranks, size=n, mode="nearest")  # (1, 1, n)
    return int(picked[0, 0, -1])


def text_frames(word: Word, n_text_frames: int, rate_hz: float) -> tuple[int, int] | None:
    """Text frames [s, s + l) a word is added into; None when it lies outside [0, n / rate].

    ``s = round(rate * max(onset, 0))``, ``l = max(1, round(rate * (min(end, n / rate) - max(onset, 0))))``
    (Python rounding, half to even), s moved back so that ``s + l <= n``.
    """
    out_stop = n_text_frames / rate_hz
    lo, hi = max(word.onset, 0.0), min(word.end, out_stop)
    if hi < lo or (hi == lo and word.end > word.onset):
        return None
    s = int(round(lo * rate_hz))
    n = max(1, int(round((hi - lo) * rate_hz)))
    s = min(s, n_text_frames - n)
    if s < 0:
        return None
    return s, n

