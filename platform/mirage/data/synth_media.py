"""Writing the synthetic stimuli: mkv movies (H.264 video + AAC audio) with PyAV."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def video_rate(fps: float) -> Fraction:
    """Exact frame rate of a float fps (29.97 -> 30000/1001)."""
    return Fraction(fps).limit_denominator(1001)


def write_mkv(path: str | Path, frames: np.ndarray, fps: float, audio: np.ndarray | None, sample_rate: int) -> None:
    """Write a Matroska file.

    frames: uint8 (n_frames, H, W, 3) RGB shown at ``fps``; H and W even.
    audio: float32 (channels, n_samples) in [-1, 1] at ``sample_rate``, or None for no audio track.
    """
    rate = video_rate(fps)
    with av.open(str(path), mode="w", format="matroska") as c:
        vs = c.add_stream("libx264", rate=rate, options={"preset": "ultrafast", "crf": "18", "g": "25"})
        vs.width, vs.height, vs.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        vs.codec_context.time_base = 1 / rate
        ast = None
        if audio is not None:
            ast = c.add_stream("aac", rate=sample_rate)
            ast.layout = "mono" if audio.shape[0] == 1 else "stereo"
        n_per_s = int(sample_rate)
        n_audio = audio.shape[1] if audio is not None else 0
        sec = 0
        for i, img in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(img, format="rgb24")
            vf.pts = i
            vf.time_base = 1 / rate
            c.mux(vs.encode(vf))
            # keep audio up to the video time so that the muxer interleaves
            while ast is not None and sec * n_per_s < n_audio and sec <= float(i / rate):
                _encode_audio(c, ast, audio, sec * n_per_s, min((sec + 1) * n_per_s, n_audio), sample_rate)
                sec += 1
        while ast is not None and sec * n_per_s < n_audio:
            _encode_audio(c, ast, audio, sec * n_per_s, min((sec + 1) * n_per_s, n_audio), sample_rate)
            sec += 1
        c.mux(vs.encode(None))
        if ast is not None:
            c.mux(ast.encode(None))


def _encode_audio(c, stream, audio: np.ndarray, lo: int, hi: int, sample_rate: int) -> None:
    chunk = np.ascontiguousarray(audio[:, lo:hi], dtype=np.float32)  # (C, n)
    af = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono" if audio.shape[0] == 1 else "stereo")
    af.sample_rate = sample_rate
    af.pts = lo
    af.time_base = Fraction(1, sample_rate)
    c.mux(stream.encode(af))
