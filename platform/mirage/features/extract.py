"""Feature extraction: per-span computation (shared by every runner) and the in-process runner.

A work item is one span of cutoffs of one stimulus; :class:`Extractor` turns it into float16
features (n, 3, n_layers, dim). ``extract_all`` runs every missing stimulus in this process and
writes the store; ``mirage.distributed.extract`` runs the same spans on a Ray Data actor pool.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mirage.config import Config, FeaturesConfig
from mirage.errors import DataError, MirageError
from mirage.features.backbone import Backbone, load_backbone
from mirage.features.inputs import (
    WordSpan,
    cutoff_times,
    n_frames_for,
    video_frame_times,
    words_before,
)
from mirage.features.readout import PassInputs, PassRunner
from mirage.features.store import StoreWriter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkItem:
    """Cutoffs [start, stop) (feature frame indices) of one stimulus."""

    stimulus_id: str
    video: str
    transcript: str | None
    start: int
    stop: int
    n_frames: int


@dataclass
class ExtractResult:
    """Outcome of an extraction run; ``failed`` maps stimulus id -> error message."""

    store: Path
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    cutoffs: int = 0
    seconds: float = 0.0
    first_result_s: float | None = None
    """Seconds from the start of the run until the first work item came back (pipeline start-up)."""

    @property
    def ok(self) -> bool:
        """No stimulus failed."""
        return not self.failed


def load_words(transcript: str | Path | None) -> list[WordSpan]:
    """Words of a transcript file in time order (no file: no words)."""
    if transcript is None:
        return []
    from mirage.data.transcripts import read_words

    return [WordSpan(text=w.text, offset=float(w.offset)) for w in read_words(transcript)]


def media_duration(video: str | Path) -> float:
    """Length of a movie file in seconds."""
    from mirage.data.media import MediaReader

    with MediaReader(video) as m:
        return float(m.duration)


class Extractor:
    """Loads the backbone once; computes the features of spans of cutoffs."""

    def __init__(self, cfg: FeaturesConfig, backbone: Backbone | None = None):
        if cfg.torch_threads:
            import torch

            torch.set_num_threads(cfg.torch_threads)
        self.cfg = cfg
        self.backbone = backbone or load_backbone(cfg)
        self.runner = PassRunner(self.backbone, cfg.rate_hz, cfg.video_fps)
        self._words: dict[str, list[WordSpan]] = {}

    def _stimulus_words(self, transcript: str | None) -> list[WordSpan]:
        if transcript is None:
            return []
        if transcript not in self._words:
            self._words = {transcript: load_words(transcript)}  # one stimulus at a time
        return self._words[transcript]

    def extract_item(self, item: WorkItem) -> np.ndarray:
        """float16 (item.stop - item.start, 3, n_layers, dim) for the item's cutoffs."""
        return self.extract_span(item.video, self._stimulus_words(item.transcript), item.start, item.stop)

    def extract_span(self, video: str | Path, words: list[WordSpan], start: int, stop: int) -> np.ndarray:
        """Features of feature frames [start, stop) of one movie: float16 (n, 3, n_layers, dim)."""
        from mirage.data.media import MediaReader

        cfg = self.cfg
        frames = np.arange(start, stop)
        cutoffs = cutoff_times(frames, cfg.rate_hz)  # (n,)
        n_audio = int(round(cfg.audio_seconds * cfg.audio_rate))
        with MediaReader(video) as media:
            duration = float(media.duration)
            times = video_frame_times(cutoffs, cfg, duration)  # (n, k)
            flat = media.frames_at(times.reshape(-1))  # (n * k, H, W, 3)
            video = flat.reshape(*times.shape, *flat.shape[1:])  # (n, k, H, W, 3)
            a0 = float(cutoffs[0]) - cfg.audio_seconds
            audio = media.audio(a0, float(cutoffs[-1]), rate=cfg.audio_rate)  # (samples,)
        out = np.zeros((len(frames), 3, self.backbone.n_layers, self.backbone.dim), np.float16)
        for lo in range(0, len(frames), cfg.pass_batch):
            hi = min(lo + cfg.pass_batch, len(frames))
            idx = range(lo, hi)
            first = [int(round((cutoffs[i] - cfg.audio_seconds - a0) * cfg.audio_rate)) for i in idx]
            audios = [_fit(audio[f: f + n_audio], n_audio) for f in first]
            videos = [video[i] for i in idx]
            word_lists = [words_before(words, float(cutoffs[i]), cfg.max_words) for i in idx]
            fr = [int(frames[i]) for i in idx]
            out[lo:hi] = self._features(fr, videos, audios, word_lists)
        if not np.isfinite(out).all():
            raise MirageError(f"{video}: features of frames [{start}, {stop}) hold NaN or inf")
        return out

    def _features(self, frames, videos, audios, word_lists) -> np.ndarray:
        """float32 (B, 3, L, D) by native fusion (one pass) or post-hoc fusion (one pass per modality)."""
        run = self.runner.run
        if self.cfg.fusion == "native":
            return run(PassInputs(frames=frames, videos=videos, audios=audios, words=word_lists))
        out = run(PassInputs(frames=frames, videos=videos))
        out[:, 1] = run(PassInputs(frames=frames, audios=audios))[:, 1]
        out[:, 2] = run(PassInputs(frames=frames, words=word_lists))[:, 2]
        return out


def _fit(x: np.ndarray, n: int) -> np.ndarray:
    """Exactly n samples (rounding can leave one short at the end of a span)."""
    return x if len(x) == n else np.pad(x[:n], (0, n - len(x[:n])))


# ------------------------------------------------------------------ planning


def stimuli_of(cfg: Config, stimuli: Iterable[str] | None = None) -> dict[str, tuple[str, str | None]]:
    """Stimulus id -> (video path, transcript path or None) from the dataset at ``cfg.data.root``."""
    from mirage.data.layout import Release

    found = Release(cfg.data.root).stimuli()
    if stimuli is None:
        if not found:
            raise DataError(f"{cfg.data.root}: no stimulus videos under stimuli/movies; expected the Algonauts layout")
        chosen = sorted(found)
    else:
        chosen = list(stimuli)
        unknown = [s for s in chosen if s not in found]
        if unknown:
            raise DataError(f"{cfg.data.root}: no video for stimuli {unknown}")
    return {s: (str(found[s].video), str(found[s].transcript) if found[s].transcript else None) for s in chosen}


def plan_items(
    stimulus_id: str, video: str, transcript: str | None, cfg: FeaturesConfig, duration: float
) -> list[WorkItem]:
    """Split a stimulus into work items of ``cfg.cutoffs_per_item`` cutoffs."""
    n = n_frames_for(duration, cfg.rate_hz)
    if n <= 0:
        raise DataError(f"{video}: {duration:.3f} s long, too short for one cutoff at {cfg.rate_hz} Hz")
    step = cfg.cutoffs_per_item
    return [WorkItem(stimulus_id, video, transcript, s, min(s + step, n), n) for s in range(0, n, step)]


def extract_all(
    cfg: Config, stimuli: Iterable[str] | None = None, overwrite: bool = False, extractor: Extractor | None = None
) -> ExtractResult:
    """Extract every missing stimulus in this process and write the store; failures are collected.

    Returns an :class:`ExtractResult`; a stimulus that fails (e.g. an undecodable movie) is listed
    in ``failed`` with its error and leaves nothing in the store.
    """
    t0 = time.perf_counter()
    with StoreWriter(cfg.features) as writer:
        result = _extract_missing(cfg, writer, stimuli, overwrite, extractor)
    result.seconds = time.perf_counter() - t0
    return result


def _extract_missing(cfg: Config, writer: StoreWriter, stimuli, overwrite: bool, extractor) -> ExtractResult:
    result = ExtractResult(store=writer.root)
    todo = stimuli_of(cfg, stimuli)
    extractor_ = extractor
    for sid, (video, transcript) in todo.items():
        if overwrite:
            writer.forget(sid)
        elif writer.has(sid):
            result.skipped.append(sid)
            continue
        if extractor_ is None:
            extractor_ = Extractor(cfg.features)
        part = None
        try:
            words = load_words(transcript)
            items = plan_items(sid, video, transcript, cfg.features, media_duration(video))
            for it in items:
                feats = extractor_.extract_span(video, words, it.start, it.stop)  # (n, 3, L, D)
                if part is None:
                    part = writer.begin(sid, (it.n_frames, *feats.shape[1:]))
                part.put(it.start, feats)
            part.commit()
        except Exception as e:  # this stimulus fails alone; the message names its file
            if part is not None:
                part.abort()
            msg = str(e) if isinstance(e, MirageError) else f"{video}: {type(e).__name__}: {e}"
            log.error("stimulus %s failed: %s", sid, msg)
            result.failed[sid] = msg
            continue
        result.written.append(sid)
        result.cutoffs += items[-1].n_frames
        log.info("stored %s (%d cutoffs)", sid, items[-1].n_frames)
    return result
