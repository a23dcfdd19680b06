"""Feature extraction: the passes of one stimulus (shared by every runner) and the in-process runner.

A stimulus is planned once (:func:`plan_stimulus`: its passes and each modality's frame count);
a work item is a span of its passes. :class:`Extractor` runs a span and returns its
:class:`ItemFeatures` (audio and vision frames, word vectors with their text frames), which any
sink (the store's :class:`~mirage.features.store.ArrayBuilder`, or :class:`FeatureArrays` in
memory) assembles: media frames are set, word vectors are added into their text frames.
``extract_all`` runs every missing stimulus in this process: each work item's features become a
span file in the store (:mod:`mirage.features.spans`), the spans are joined and the stimulus is
committed (:func:`commit_spans`); spans left by an interrupted run are reused.
``mirage.distributed.extract`` runs the same items on a Ray Data actor pool with the same span
files and commit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from mirage.config import MODALITIES, MODALITY_AXIS, Config, FeaturesConfig
from mirage.data.layout import Release
from mirage.data.media import MediaReader
from mirage.errors import DataError, FeatureStoreError, MirageError
from mirage.features.backbone import load_backbone
from mirage.features.inputs import (
    Pass,
    Transcript,
    audio_range,
    frame_indices,
    n_frames,
    pass_plan,
    read_transcript,
    text_frames,
    text_window,
    video_times,
)
from mirage.features.interface import Backbone
from mirage.features.readout import PassRunner
from mirage.features.spans import Assembled, SpanMeta, assemble, existing_spans, write_span
from mirage.features.store import StoreWriter, file_sha256, library_versions, remove_spans
from mirage.progress import tracked

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ planning


@dataclass
class StimulusPlan:
    """The passes of one stimulus and what its media and transcript measure.

    ``frames``: each modality's frame count; ``audio_samples``: length of the decoded track at
    ``audio_rate`` (0 without audio); ``vision_s``: video duration; ``fps``: video frame rate.
    """

    video: str
    transcript: Transcript | None
    passes: list[Pass]
    frames: dict[str, int]
    vision_s: float
    fps: float
    audio_samples: int

    @property
    def n_frames(self) -> int:
        """Rows of the stored array: the largest modality frame count."""
        return max(self.frames.values())


def plan_stimulus(video: str | Path, transcript: str | Path | None, cfg: FeaturesConfig) -> StimulusPlan:
    """Plan a stimulus from its media facts and transcript (nothing is decoded).

    Without words (no transcript, or none in it) text is all zeros, as long as the longest of the
    transcript, the audio and the video. A movie whose packets end more than
    ``cfg.media_tolerance_s`` before its declared duration (truncated or corrupt) raises DataError.
    """
    with MediaReader(video) as m:
        vision_s = float(m.printed_duration)
        fps = float(m.video_info.fps)
        has_audio = m.has_audio
        m.check_complete(cfg.media_tolerance_s)
    if vision_s <= 0:
        raise DataError(f"{video}: duration {vision_s} s; expected a movie longer than 0 s")
    n_decoded = int(round(vision_s * cfg.audio_decode_rate)) if has_audio else 0
    g = math.gcd(cfg.audio_rate, cfg.audio_decode_rate)  # julius' output length: int(new * n / old), reduced
    samples = int(cfg.audio_rate // g * n_decoded / (cfg.audio_decode_rate // g))
    audio_s = samples / cfg.audio_rate if has_audio else None
    words = read_transcript(transcript, cfg.transcript_tr)
    text_s = words.duration if words and words.words else max(words.duration if words else 0.0, vision_s, audio_s or 0.0)
    frames = {
        "vision": n_frames(vision_s, cfg.rate_hz),
        "audio": n_frames(audio_s, cfg.rate_hz) if audio_s is not None else 0,
        "text": n_frames(text_s, cfg.rate_hz),
    }
    passes = pass_plan(words, audio_s, vision_s, cfg.rate_hz)
    return StimulusPlan(str(video), words, passes, frames, vision_s, fps, samples)


@dataclass(frozen=True)
class WorkItem:
    """Passes [start, stop) of one stimulus (``n_passes`` in all)."""

    stimulus_id: str
    video: str
    transcript: str | None
    start: int
    stop: int
    n_passes: int


def plan_items(stimulus_id: str, video: str, transcript: str | None, cfg: FeaturesConfig) -> tuple[StimulusPlan, list[WorkItem]]:
    """Plan a stimulus and split its passes into work items of ``cfg.cutoffs_per_item`` passes."""
    plan = plan_stimulus(video, transcript, cfg)
    n, step = len(plan.passes), cfg.cutoffs_per_item
    return plan, [WorkItem(stimulus_id, video, transcript, s, min(s + step, n), n) for s in range(0, n, step)]


def span_key(plan: StimulusPlan, transcript: str | None, cfg: FeaturesConfig,
             libraries: dict[str, str] | None = None) -> str:
    """16 hex naming the spans of one plan of a stimulus (:func:`mirage.features.spans.span_folder`):
    a hash of the movie file (size, modification time), the transcript's bytes, the pass plan, the
    span split and pass batching, and the library versions (``libraries``: computed when None)."""
    st = os.stat(plan.video)
    blob = {
        "video": [st.st_size, st.st_mtime_ns],
        "transcript": file_sha256(Path(transcript)) if transcript else None,
        "passes": [[p.cutoff, list(p.words), p.audio_frame, p.vision_frame] for p in plan.passes],
        "frames": plan.frames, "audio_samples": plan.audio_samples,
        "cutoffs_per_item": cfg.cutoffs_per_item, "pass_batch": cfg.pass_batch,
        "libraries": libraries if libraries is not None else library_versions(),
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------ results


class FeatureSink(Protocol):
    """Where item features are assembled (the store's PartialWrite, or FeatureArrays); ``modality`` is
    its index on the store's modality axis (``mirage.config.MODALITY_AXIS``)."""

    def set(self, modality: int, frame: int, vector: np.ndarray) -> None: ...

    def add(self, modality: int, start: int, stop: int, vector: np.ndarray) -> None: ...


@dataclass
class ItemFeatures:
    """The features one work item produced, each vector float32 (n_layers, dim).

    ``vision``/``audio``: frame index -> vector; ``text``: (start, stop, vector) per word, the
    text frames [start, stop) it is added into.
    """

    vision: dict[int, np.ndarray] = field(default_factory=dict)
    audio: dict[int, np.ndarray] = field(default_factory=dict)
    text: list[tuple[int, int, np.ndarray]] = field(default_factory=list)

    def write(self, sink: FeatureSink) -> None:
        """Set the media frames and add the word vectors into their text frames."""
        for k, v in self.vision.items():
            sink.set(MODALITY_AXIS["vision"], k, v)
        for k, v in self.audio.items():
            sink.set(MODALITY_AXIS["audio"], k, v)
        for s, e, v in self.text:
            sink.add(MODALITY_AXIS["text"], s, e, v)

    def to_arrays(self, n_layers: int, dim: int) -> dict[str, np.ndarray]:
        """The span file's arrays (:data:`mirage.features.spans.ARRAYS`), vectors float32."""
        def stack(vs: list[np.ndarray]) -> np.ndarray:
            return np.stack(vs).astype(np.float32) if vs else np.zeros((0, n_layers, dim), np.float32)

        return {
            "vision_frames": np.asarray(list(self.vision), np.int64), "vision": stack(list(self.vision.values())),
            "audio_frames": np.asarray(list(self.audio), np.int64), "audio": stack(list(self.audio.values())),
            "text_bins": np.asarray([(s, e) for s, e, _ in self.text], np.int64).reshape(-1, 2),
            "text": stack([t[2] for t in self.text]),
        }


class FeatureArrays:
    """In-memory sink: float32 (n_frames_m, n_layers, dim) per modality, zeros where nothing was set."""

    def __init__(self, frames: dict[str, int], n_layers: int, dim: int):
        self.arrays = {m: np.zeros((frames[m], n_layers, dim), np.float32) for m in MODALITIES}

    def set(self, modality: int, frame: int, vector: np.ndarray) -> None:
        self.arrays[MODALITIES[modality]][frame] = vector

    def add(self, modality: int, start: int, stop: int, vector: np.ndarray) -> None:
        self.arrays[MODALITIES[modality]][start:stop] += vector[None]


@dataclass
class ExtractResult:
    """Outcome of an extraction run; ``failed`` maps stimulus id -> error message."""

    store: Path
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    cutoffs: int = 0
    """Backbone passes run (distinct cutoffs of the stimuli written)."""
    seconds: float = 0.0
    first_result_s: float | None = None
    """Seconds from the start of the run until the first work item came back (pipeline start-up)."""
    spans_computed: int = 0
    """Work items whose features were computed in this run."""
    spans_reused: int = 0
    """Work items whose span an earlier, interrupted run had left verified on disk."""
    driver_rows: int = 0
    """Result rows the Ray runner's driver received (0 in-process)."""
    driver_bytes: int = 0
    """Bytes of those rows (pickled size): what crossed into the driver."""
    span_bytes: int = 0
    """Bytes of the span files computed in this run: the float32 feature payload the work items produced
    (what a runner that returned features to its driver would have moved through it)."""

    @property
    def ok(self) -> bool:
        """No stimulus failed."""
        return not self.failed


# ------------------------------------------------------------------ extraction


class Extractor:
    """Loads the backbone once; runs spans of a stimulus' passes (one stimulus' media cached)."""

    def __init__(self, cfg: FeaturesConfig, backbone: Backbone | None = None):
        if cfg.torch_threads:
            import torch

            torch.set_num_threads(cfg.torch_threads)
        self.cfg = cfg
        self.backbone = backbone or load_backbone(cfg)
        self.runner = PassRunner(self.backbone, cfg)
        self._plan: tuple[tuple, StimulusPlan] | None = None
        self._audio: tuple[str, np.ndarray] | None = None

    def plan(self, video: str | Path, transcript: str | Path | None) -> StimulusPlan:
        """The stimulus' plan (cached for the last stimulus)."""
        key = (str(video), None if transcript is None else str(transcript))
        if self._plan is None or self._plan[0] != key:
            self._plan = (key, plan_stimulus(video, transcript, self.cfg))
        return self._plan[1]

    def audio_track(self, plan: StimulusPlan) -> np.ndarray | None:
        """The whole decoded track at ``audio_rate`` (cached for the last stimulus); None without audio."""
        if plan.audio_samples == 0:
            return None
        if self._audio is None or self._audio[0] != plan.video:
            with MediaReader(plan.video) as m:
                track = m.audio_track(self.cfg.audio_decode_rate, self.cfg.audio_rate, plan.vision_s,
                                      max_pad_s=self.cfg.media_tolerance_s)
            if len(track) != plan.audio_samples:
                raise DataError(f"{plan.video}: decoded {len(track)} audio samples, the plan expects {plan.audio_samples}")
            self._audio = (plan.video, track)
        return self._audio[1]

    def extract_item(self, item: WorkItem) -> ItemFeatures:
        """Features of the item's passes."""
        return self.extract_passes(self.plan(item.video, item.transcript), item.start, item.stop)

    def extract_passes(self, plan: StimulusPlan, start: int, stop: int) -> ItemFeatures:
        """Run passes [start, stop) of a planned stimulus."""
        cfg, passes = self.cfg, plan.passes[start:stop]
        audio = self.audio_track(plan)
        indices = [frame_indices(video_times(p.cutoff, cfg, plan.vision_s), plan.vision_s, plan.fps) for p in passes]
        wanted = np.unique(np.concatenate(indices)) if indices else np.zeros(0, np.int64)
        with MediaReader(plan.video) as m:
            decoded = m.frames_by_index(wanted, past_end_s=cfg.media_tolerance_s)  # (n_unique, H, W, 3)
        where = {int(k): i for i, k in enumerate(wanted)}
        videos = [decoded[[where[int(k)] for k in idx]] for idx in indices]  # each (n_f, H, W, 3)
        ranges = [audio_range(p.cutoff, cfg, len(audio)) if audio is not None else (0, 0) for p in passes]
        out = ItemFeatures()
        for group in _batches([b - a for a, b in ranges], cfg.pass_batch):
            clips = None if audio is None else [audio[slice(*ranges[i])] for i in group]
            self._run_passes(plan, [passes[i] for i in group], [videos[i] for i in group], clips, out)
        return out

    def _run_passes(
        self, plan: StimulusPlan, passes: list[Pass], videos: list[np.ndarray], audios: list[np.ndarray] | None,
        out: ItemFeatures,
    ) -> None:
        """Native: one sequence per pass; post-hoc: one per pass and modality it serves. Batched."""
        r, cfg = self.runner, self.cfg
        windows = [text_window(plan.transcript, p.cutoff, cfg.max_words) for p in passes]
        if cfg.fusion == "native":
            res = r.run([r.native_prompt(w) for w in windows], videos, audios, audio_in_video=audios is not None)
            vis = aud = txt = dict(enumerate(res))
        else:
            v = [i for i, p in enumerate(passes) if p.vision_frame is not None]
            a = [i for i, p in enumerate(passes) if p.audio_frame is not None and audios is not None]
            t = [i for i, p in enumerate(passes) if p.words and windows[i].text]
            vis = dict(zip(v, r.run([r.video_pad] * len(v), [videos[i] for i in v]) if v else []))
            aud = dict(zip(a, r.run([r.audio_pad] * len(a), audios=[audios[i] for i in a]) if a else []))
            txt = dict(zip(t, r.run([windows[i].text for i in t]) if t else []))
        for i, p in enumerate(passes):
            if p.vision_frame is not None:
                out.vision[p.vision_frame] = self._finite(r.vision(vis[i]), plan, p, "vision")
            if p.audio_frame is not None and audios is not None:
                out.audio[p.audio_frame] = self._finite(r.audio(aud[i], len(audios[i])), plan, p, "audio")
            for w in p.words:
                bins = text_frames(plan.transcript.words[w], plan.frames["text"], cfg.rate_hz)
                vec = None if bins is None or i not in txt else r.word(txt[i], windows[i], w)
                if vec is not None:
                    out.text.append((bins[0], bins[0] + bins[1], self._finite(vec, plan, p, "text")))

    @staticmethod
    def _finite(vec: np.ndarray, plan: StimulusPlan, p: Pass, what: str) -> np.ndarray:
        if not np.isfinite(vec).all():
            raise MirageError(f"{plan.video}: {what} features at {p.cutoff:.3f} s hold NaN or inf")
        return vec

    def extract_stimulus(self, video: str | Path, transcript: str | Path | None) -> dict[str, np.ndarray]:
        """Every pass of one stimulus: modality -> float32 (n_frames_m, n_layers, dim).

        Passes run in the work items' spans, so the numbers equal those of the store's runners.
        """
        plan = self.plan(video, transcript)
        sink = FeatureArrays(plan.frames, self.backbone.n_layers, self.backbone.dim)
        for lo in range(0, len(plan.passes), self.cfg.cutoffs_per_item):
            self.extract_passes(plan, lo, min(lo + self.cfg.cutoffs_per_item, len(plan.passes))).write(sink)
        return sink.arrays


def _batches(audio_lengths: list[int], size: int) -> list[list[int]]:
    """Consecutive pass indices in batches of at most ``size`` with equal audio windows.

    The processor pads shorter audio and its log-mel frames near a padded end change, so only
    passes whose windows have one length share a forward.
    """
    out: list[list[int]] = []
    for i, n in enumerate(audio_lengths):
        if out and len(out[-1]) < size and audio_lengths[out[-1][0]] == n:
            out[-1].append(i)
        else:
            out.append([i])
    return out


# ------------------------------------------------------------------ the in-process runner


def stimuli_of(cfg: Config, stimuli: Iterable[str] | None = None) -> dict[str, tuple[str, str | None]]:
    """Stimulus id -> (video path, transcript path or None) from the dataset at ``cfg.data.root``."""
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


def extract_all(
    cfg: Config, stimuli: Iterable[str] | None = None, overwrite: bool = False, extractor: Extractor | None = None,
    progress: bool = False,
) -> ExtractResult:
    """Extract every missing stimulus in this process and write the store; failures are collected.

    ``progress``: show the stimuli done on stderr (:func:`mirage.progress.tracked`).

    Returns an :class:`ExtractResult`; a stimulus that fails (e.g. an undecodable movie) is listed
    in ``failed`` with its error and leaves nothing in the store.
    """
    t0 = time.perf_counter()
    with StoreWriter(cfg.features) as writer:
        result = _extract_missing(cfg, writer, stimuli, overwrite, extractor, progress)
    result.seconds = time.perf_counter() - t0
    return result


def commit_spans(writer: StoreWriter, assembled: Assembled) -> Path:
    """Commit a stimulus whose spans :func:`~mirage.features.spans.assemble` joined (here or on a
    worker) and drop its spans; a join that failed raises FeatureStoreError and commits nothing."""
    sid = assembled.stimulus_id
    if assembled.bad:
        raise FeatureStoreError(
            f"{writer.root}: spans {[m.rel for m in assembled.bad]} of {sid} are corrupt; expected their checksums"
        )
    if assembled.built is None:
        raise FeatureStoreError(assembled.error or f"{sid}: nothing was assembled")
    path = writer.commit_built(assembled.built)
    remove_spans(writer.root, sid)
    return path


def _store_stimulus(writer: StoreWriter, extractor: Extractor, sid: str, plan: StimulusPlan, items: list[WorkItem],
                    key: str, result: ExtractResult) -> None:
    """Compute the spans of a stimulus not on disk yet, join them and commit; a corrupt span is computed again."""
    root, bb = writer.root, extractor.backbone

    def compute(it: WorkItem) -> SpanMeta:
        arrays = extractor.extract_passes(plan, it.start, it.stop).to_arrays(bb.n_layers, bb.dim)
        meta = write_span(root, sid, key, it.start, it.stop, arrays)
        result.spans_computed += 1
        result.span_bytes += meta.bytes
        return meta

    have = existing_spans(root, sid, key)
    result.spans_reused += sum((it.start, it.stop) in have for it in items)
    spans = [have.get((it.start, it.stop)) or compute(it) for it in items]
    assembled = assemble(root, sid, plan.n_frames, plan.frames, spans)
    if assembled.bad:
        redo = {(m.start, m.stop) for m in assembled.bad}
        result.spans_reused -= len(redo)
        spans = [compute(it) if (it.start, it.stop) in redo else m for it, m in zip(items, spans)]
        assembled = assemble(root, sid, plan.n_frames, plan.frames, spans)
    commit_spans(writer, assembled)


def _extract_missing(cfg: Config, writer: StoreWriter, stimuli, overwrite: bool, extractor,
                     progress: bool = False) -> ExtractResult:
    result = ExtractResult(store=writer.root)
    libraries = library_versions()
    for sid, (video, transcript) in tracked(stimuli_of(cfg, stimuli).items(), "extract", progress, name=lambda i: i[0]):
        if not overwrite and writer.has(sid):  # overwrite: the old features stay until the new ones commit
            result.skipped.append(sid)
            continue
        try:
            plan, items = plan_items(sid, video, transcript, cfg.features)
            extractor = extractor or Extractor(cfg.features)
            _store_stimulus(writer, extractor, sid, plan, items, span_key(plan, transcript, cfg.features, libraries),
                            result)
        except Exception as e:  # this stimulus fails alone; the message names its file
            if not writer.lease_held:
                raise  # another writer owns the store now: its spans are not ours to remove
            remove_spans(writer.root, sid)
            msg = str(e) if isinstance(e, MirageError) else f"{video}: {type(e).__name__}: {e}"
            log.error("stimulus %s failed: %s", sid, msg)
            result.failed[sid] = msg
            continue
        result.written.append(sid)
        result.cutoffs += len(plan.passes)
        log.info("stored %s (%d passes)", sid, len(plan.passes))
    return result
