"""Decoding stimulus movies (video frames and audio) with PyAV.

Times are seconds from the start of the file. Any frame rate, resolution,
sample rate and channel count is accepted; audio comes out as mono float32 at
the requested rate, zero outside the file.

Feature extraction decodes as the reference extractor does (MoviePy piping ffmpeg):
``printed_duration`` is the container duration as ffmpeg prints it (10 ms steps),
``frames_by_index`` returns the n-th frame of the stream as rgb24, and ``audio_track``
gives the whole track as int16 PCM at ``decode_rate`` stereo, averaged to mono and
resampled with julius' ``ResampleFrac`` (windowed sinc).

A truncated or corrupt file keeps the duration its header promises while its packets stop
early: :meth:`MediaReader.stream_ends` reads where each stream's data really ends (a demux pass,
nothing decoded), :meth:`MediaReader.check_complete` raises when a stream ends more than a
tolerance before the container's duration, and the extraction decoders (``frames_by_index``,
``audio_track``) raise rather than repeat a frame or pad silence past that tolerance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from mirage.errors import DataError

# Decode forward from the current position rather than seek when the next
# requested time is at most this many seconds ahead.
_SEEK_AHEAD_S = 5.0
# stream_ends demuxes from this many seconds before the declared end (speed only: the packets up
# to the end of the file are read whatever the seek lands on).
_TAIL_S = 30.0


@dataclass(frozen=True)
class VideoInfo:
    """Video stream facts: frame rate (frames/s), width and height in pixels, codec name."""

    fps: float
    width: int
    height: int
    codec: str


@dataclass(frozen=True)
class AudioInfo:
    """Audio stream facts: sample rate (Hz), channel count, codec name."""

    sample_rate: int
    channels: int
    codec: str


@dataclass(frozen=True)
class StreamEnds:
    """Where the data of each stream ends, against the duration the container declares.

    ``declared``: container duration in seconds (None when the header has none); ``ends``:
    stream kind ("video", "audio") -> end of its last packet (pts + duration) in seconds from the
    file start, 0.0 for a stream without any packet.
    """

    declared: float | None
    ends: dict[str, float]

    def missing(self) -> dict[str, float]:
        """Seconds each stream stops short of ``declared`` (0.0 when it reaches it; {} if undeclared)."""
        if self.declared is None:
            return {}
        return {k: max(0.0, self.declared - e) for k, e in self.ends.items()}


class MediaReader:
    """Random access to the frames and the audio of one movie file.

    Use as a context manager (``with MediaReader(path) as m: ...``) or call ``close()``.
    Raises DataError naming the file if it is missing or not a decodable media file.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: media file not found")
        try:
            self._c = av.open(str(self.path), mode="r")
        except (av.error.FFmpegError, OSError, ValueError) as e:
            raise DataError(f"{self.path}: not a decodable media file ({e})") from None
        self._v = self._c.streams.video[0] if self._c.streams.video else None
        self._a = self._c.streams.audio[0] if self._c.streams.audio else None
        if self._v is not None:
            self._v.thread_type = "AUTO"
        self._rgb = VideoReformatter()  # one conversion context for every frame
        # time 0 = start of the container (first presentation time of any stream)
        self._t0 = self._c.start_time / av.time_base if self._c.start_time is not None else 0.0

    # --- context

    def __enter__(self) -> "MediaReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the file."""
        self._c.close()

    # --- facts

    @property
    def has_video(self) -> bool:
        """Whether the file has a video stream."""
        return self._v is not None

    @property
    def has_audio(self) -> bool:
        """Whether the file has an audio stream."""
        return self._a is not None

    @property
    def video_info(self) -> VideoInfo:
        """Frame rate, size and codec of the video stream."""
        v = self._require_video()
        rate = v.average_rate or v.guessed_rate or v.base_rate
        return VideoInfo(fps=float(rate) if rate else 0.0, width=v.codec_context.width,
                         height=v.codec_context.height, codec=v.codec_context.name)

    @property
    def audio_info(self) -> AudioInfo:
        """Sample rate, channel count and codec of the audio stream."""
        a = self._require_audio()
        return AudioInfo(sample_rate=a.codec_context.sample_rate, channels=a.codec_context.channels,
                         codec=a.codec_context.name)

    @property
    def duration(self) -> float:
        """Length of the file in seconds (the longest stream; container header, else stream headers)."""
        ends = []
        for s in (self._v, self._a):
            if s is not None and s.duration is not None and s.time_base is not None:
                start = s.start_time or 0
                ends.append(float((start + s.duration) * s.time_base))
        if ends:
            return max(ends)
        if self._c.duration is not None:
            return self._c.duration / av.time_base
        raise DataError(f"{self.path}: duration unknown (no duration in the container or stream headers)")

    @property
    def length_s(self) -> float:
        """:attr:`duration` to the millisecond: the stimulus length that ``data check`` and the training
        windows reconcile with the fMRI run's (:func:`mirage.data.fmri.reconcile_lengths`)."""
        return round(float(self.duration), 3)

    @property
    def printed_duration(self) -> float:
        """The container duration rounded to 10 ms as ffmpeg prints it (``Duration: 00:00:15.15``).

        This is the duration MoviePy reports for a clip; falls back to :attr:`duration` when the
        container has none.
        """
        if self._c.duration is None:
            return self.duration
        centis = (int(self._c.duration) + 5000) // 10000  # ffmpeg adds 5 ms, then truncates to 10 ms
        return centis / 100.0

    # --- integrity

    def stream_ends(self) -> StreamEnds:
        """Where the video and audio packets end (a demux pass over the file's tail, nothing decoded).

        Raises DataError naming the file when the packets do not demux.
        """
        declared = self._c.duration / av.time_base if self._c.duration is not None else None
        kinds = {s.index: s.type for s in (self._v, self._a) if s is not None}
        tail = max(0.0, (declared or 0.0) - _TAIL_S)
        ends: dict[str, float | None] = {}
        if tail > 0:
            try:
                ends = self._packet_ends(kinds, tail)
            except av.error.FFmpegError:
                ends = {}
        if not ends or any(e is None for e in ends.values()):  # no seek, or a stream without packets in the tail
            try:
                ends = self._packet_ends(kinds, 0.0)
            except av.error.FFmpegError as e:
                raise DataError(f"{self.path}: packets do not demux ({e}); the file is truncated or corrupt") from None
        return StreamEnds(declared, {k: (e if e is not None else 0.0) for k, e in ends.items()})

    def check_complete(self, tolerance_s: float) -> StreamEnds:
        """Raise DataError when a stream's packets end more than ``tolerance_s`` seconds before the
        container's duration (a truncated or corrupt file); returns :meth:`stream_ends`."""
        se = self.stream_ends()
        short = [f"{kind} data ends at {se.ends[kind]:.2f} s ({gap:.2f} s missing)"
                 for kind, gap in se.missing().items() if gap > tolerance_s]
        if short:
            raise DataError(
                f"{self.path}: {', '.join(short)} of {se.declared:.2f} s, the file is truncated or corrupt; "
                f"expected every stream to reach the container's duration within {tolerance_s:g} s"
            )
        return se

    def _packet_ends(self, kinds: dict[int, str], start: float) -> dict[str, float | None]:
        """Stream kind -> end (pts + duration, seconds) of its last packet from ``start`` on; None if none."""
        ends: dict[str, float | None] = dict.fromkeys(kinds.values())
        with av.open(str(self.path), mode="r") as c:  # a demuxer of its own: the reader's position is kept
            if start > 0:
                c.seek(int((start + self._t0) * av.time_base), backward=True, any_frame=False)
            for pkt in c.demux([c.streams[i] for i in kinds]):
                ts = pkt.pts if pkt.pts is not None else pkt.dts
                if ts is None or pkt.time_base is None:  # the flush packet at the end of each stream
                    continue
                end = float((ts + (pkt.duration or 0)) * pkt.time_base) - self._t0
                kind = kinds[pkt.stream.index]
                ends[kind] = end if ends[kind] is None else max(ends[kind], end)
        return ends

    # --- video

    def frames_by_index(self, indices, past_end_s: float = math.inf) -> np.ndarray:
        """Frame number ``k`` of the video stream (counted at its average frame rate) for each index.

        indices: (n,) ints; past the last frame gives the last frame, up to ``past_end_s`` seconds
        after the last decodable frame ends (further raises DataError, see :meth:`frames_at`).
        Returns uint8 (n, H, W, 3) RGB.
        """
        fps = self.video_info.fps
        if fps <= 0:
            raise DataError(f"{self.path}: video frame rate unknown; expected a constant-rate stream")
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return self.frames_at((np.maximum(idx, 0) + 0.5) / fps, past_end_s)  # the middle of frame k's display interval

    def _require_video(self):
        if self._v is None:
            raise DataError(f"{self.path}: no video stream, expected one")
        return self._v

    def _require_audio(self):
        if self._a is None:
            raise DataError(f"{self.path}: no audio track, expected one")
        return self._a

    def _video_frames(self, start: float):
        """Decoded video frames from the keyframe at or before ``start`` onwards."""
        v = self._v
        offset = int(math.floor((max(start, 0.0) + self._t0) / v.time_base))
        self._c.seek(offset, stream=v, backward=True, any_frame=False)
        return self._c.decode(v)

    def frames_at(self, times, past_end_s: float = math.inf) -> np.ndarray:
        """The frame shown at each time (the last frame starting at or before it).

        times: (n,) seconds; before the first frame gives the first frame, after the end the last,
        unless the time lies more than ``past_end_s`` seconds after the last decodable frame ends:
        then DataError names the file and the seconds missing (a truncated or corrupt stream).
        Returns uint8 (n, H, W, 3) RGB.
        """
        self._require_video()
        times = np.asarray(times, dtype=np.float64).reshape(-1)
        out: list[np.ndarray | None] = [None] * len(times)
        if len(times) == 0:
            v = self._v.codec_context
            return np.zeros((0, v.height, v.width, 3), np.uint8)
        order = np.argsort(times, kind="stable")
        try:
            self._fill_frames(times, order, out, past_end_s)
        except av.error.FFmpegError as e:
            raise DataError(f"{self.path}: video does not decode ({e})") from None
        return np.stack(out)

    def _fill_frames(self, times: np.ndarray, order: np.ndarray, out: list, past_end_s: float) -> None:
        frames = None
        prev = None  # last decoded frame (time, frame)
        cur = None  # next decoded frame not yet passed
        pos = -math.inf
        last = None  # (frame, its RGB array): repeated times convert once
        for idx in order:
            t = float(times[idx])
            if frames is None or t > pos + _SEEK_AHEAD_S or (prev is not None and t < prev[0]):
                frames, prev, cur = self._restart(t)
            # advance until the next frame starts after t
            while cur is not None and cur[0] <= t + 1e-9:
                prev = cur
                cur = self._next_frame(frames)
            pos = prev[0] if prev is not None else pos
            chosen = prev if prev is not None else cur
            if chosen is None:
                raise DataError(f"{self.path}: no decodable video frame near {t:.3f} s")
            if cur is None and t > self._frame_end(chosen) + past_end_s:
                end = self._frame_end(chosen)
                raise DataError(
                    f"{self.path}: video frame at {t:.2f} s requested but the decodable video ends at {end:.2f} s "
                    f"({t - end:.2f} s missing), the file is truncated or corrupt; expected frames up to "
                    f"{past_end_s:g} s past the last one"
                )
            if last is None or last[0] is not chosen[1]:
                last = (chosen[1], self._rgb.reformat(chosen[1], format="rgb24").to_ndarray())  # (H, W, 3)
            out[idx] = last[1]

    def _frame_end(self, frame: tuple) -> float:
        """End of a decoded (time, frame)'s display interval in seconds (one frame period without a duration)."""
        t, f = frame
        if f.duration and f.time_base is not None:
            return t + float(f.duration * f.time_base)
        fps = self.video_info.fps
        return t + (1.0 / fps if fps > 0 else 0.0)

    def _restart(self, t: float):
        """Seek before ``t``; returns (frame iterator, None, first frame). Falls back to the file start."""
        frames = self._video_frames(t)
        first = self._next_frame(frames)
        if first is not None and first[0] > t + 1e-9 and t > 0:
            frames = self._video_frames(0.0)
            first = self._next_frame(frames)
        return frames, None, first

    # --- audio

    def audio(self, start: float, end: float, rate: int = 16000) -> np.ndarray:
        """Mono audio of [start, end) seconds resampled to ``rate`` Hz.

        Returns float32 (n_samples,), n_samples = round((end - start) * rate); zero before 0
        and after the end of the file. Channels are averaged.
        """
        a = self._require_audio()
        if end < start:
            raise ValueError(f"audio span end {end} < start {start}")
        n = int(round((end - start) * rate))
        out = np.zeros(n, np.float32)
        if n == 0 or end <= 0:
            return out
        try:
            t0, y = self._decode_audio(a, start, end, rate)
            if t0 > max(start, 0.0) + 1.0 / rate and start > 0:
                t0, y = self._decode_audio(a, 0.0, end, rate)
        except av.error.FFmpegError as e:
            raise DataError(f"{self.path}: audio does not decode ({e})") from None
        first = int(round((t0 - start) * rate))  # index in `out` of y[0]
        lo, hi = max(first, 0), min(first + len(y), n)
        if hi > lo:
            out[lo:hi] = y[lo - first: hi - first]
        return out

    def audio_track(
        self, decode_rate: int = 44100, rate: int = 16000, duration: float | None = None, max_pad_s: float = math.inf
    ) -> np.ndarray:
        """The whole audio track, mono float32 at ``rate`` Hz, decoded as MoviePy + julius do.

        The track is converted to int16 stereo PCM at ``decode_rate`` (ffmpeg's swresample),
        cut or zero-padded to ``round(duration * decode_rate)`` samples (``duration`` defaults to
        :attr:`printed_duration`), scaled by 1/32768, averaged over channels in float64 and cast to
        float32, then resampled to ``rate`` with ``julius.resample.ResampleFrac``.
        Padding longer than ``max_pad_s`` seconds raises DataError (a truncated or corrupt track).
        Returns (int(rate * n_decoded / decode_rate),).
        """
        import julius
        import torch

        self._require_audio()
        n = int(round((self.printed_duration if duration is None else duration) * decode_rate))
        resampler = av.AudioResampler(format="s16", layout="stereo", rate=decode_rate)
        chunks: list[np.ndarray] = []
        try:
            with av.open(str(self.path), mode="r") as c:  # a fresh demuxer: decode from the first packet
                for frame in c.decode(c.streams.audio[0]):
                    chunks += [r.to_ndarray().reshape(-1, 2) for r in resampler.resample(frame)]  # (k, 2) int16
            chunks += [r.to_ndarray().reshape(-1, 2) for r in resampler.resample(None)]
        except av.error.FFmpegError as e:
            raise DataError(f"{self.path}: audio does not decode ({e})") from None
        pcm = np.concatenate(chunks) if chunks else np.zeros((0, 2), np.int16)  # (samples, 2)
        if n - len(pcm) > max_pad_s * decode_rate:
            raise DataError(
                f"{self.path}: audio decodes to {len(pcm) / decode_rate:.2f} s of {n / decode_rate:.2f} s "
                f"({(n - len(pcm)) / decode_rate:.2f} s missing), the file is truncated or corrupt; expected at most "
                f"{max_pad_s:g} s of padding"
            )
        stereo = np.zeros((n, 2), np.int16)
        stereo[: min(n, len(pcm))] = pcm[:n]
        mono = (stereo / 32768.0).mean(axis=1).astype(np.float32)  # (n,)
        if decode_rate == rate:
            return mono
        with torch.inference_mode():
            out = julius.resample.ResampleFrac(decode_rate, rate)(torch.from_numpy(mono)[None])[0]
        return out.numpy().astype(np.float32, copy=False)

    def _decode_audio(self, a, start: float, end: float, rate: int) -> tuple[float, np.ndarray]:
        """Decode from the packet at or before ``start`` to past ``end``; returns (time of first sample, mono)."""
        offset = int(math.floor((max(start - 0.1, 0.0) + self._t0) / a.time_base))
        self._c.seek(offset, stream=a, backward=True, any_frame=False)
        resampler = av.AudioResampler(format="fltp", rate=rate)
        chunks: list[np.ndarray] = []
        t0: float | None = None
        for frame in self._c.decode(a):
            if t0 is None:
                t0 = float(frame.time) - self._t0 if frame.time is not None else 0.0
            for r in resampler.resample(frame):
                chunks.append(r.to_ndarray().mean(axis=0, dtype=np.float32))
            if frame.time is not None and frame.time - self._t0 > end + 0.1:
                break
        for r in resampler.resample(None):
            chunks.append(r.to_ndarray().mean(axis=0, dtype=np.float32))
        if t0 is None:
            return 0.0, np.zeros(0, np.float32)
        return t0, np.concatenate(chunks) if chunks else np.zeros(0, np.float32)

    def _next_frame(self, frames):
        """(time, frame) of the next decoded frame, or None at the end."""
        for f in frames:
            return (float(f.time) - self._t0 if f.time is not None else 0.0), f
        return None
