"""Spans of a stimulus's features: written where they are computed, joined where a stimulus commits.

Layout (inside a store directory, on the volume every node shares)::

    <store>/.spans/<stimulus_id>/<plan key>/<start>-<stop>.<bytes>.<sha256>.npz

A span holds what one work item (passes [start, stop) of the stimulus) produced, float32:
``vision_frames`` (n_v,) with ``vision`` (n_v, n_layers, dim), ``audio_frames`` with ``audio``, and
``text_bins`` (n_t, 2) with ``text`` (n_t, n_layers, dim), the text frames [start, stop) each word
vector is added into. It appears whole (temporary name, fsync, rename) and its name carries its
size and checksum, so a listing tells a complete span from a cut one without reading it and the
joiner verifies every byte it reads. The plan key hashes what fixes the span's numbers beyond the
store key (the media file, the transcript, the pass plan, the span split, library versions):
spans of another plan of the stimulus are never joined.

:func:`assemble` joins the spans of a stimulus in ``start`` order (the order the in-process runner
adds word vectors in, so the sums are the same to the bit) into an
:class:`~mirage.features.store.ArrayBuilder` and returns the finished array's
:class:`~mirage.features.store.Built` for the store's writer to commit.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mirage.atomic import write_bytes
from mirage.config import MODALITIES, MODALITY_AXIS
from mirage.errors import FeatureStoreError
from mirage.features.store import SPANS, ArrayBuilder, Built

ARRAYS = tuple(x for m in MODALITIES for x in ("text_bins" if m == "text" else f"{m}_frames", m))
"""Arrays of a span file: each modality's frame indices (text: its [start, stop) bins) and its vectors."""
_NAME = re.compile(r"^(\d+)-(\d+)\.(\d+)\.([0-9a-f]{64})\.npz$")


@dataclass(frozen=True)
class SpanMeta:
    """A span on disk: passes [start, stop) of a stimulus at ``rel`` (relative to the store directory)."""

    stimulus_id: str
    start: int
    stop: int
    rel: str
    sha256: str
    bytes: int

    def to_row(self) -> dict:
        """Plain values (a Ray Data row)."""
        return {"stimulus_id": self.stimulus_id, "start": self.start, "stop": self.stop, "rel": self.rel,
                "sha256": self.sha256, "bytes": self.bytes}

    @classmethod
    def from_row(cls, row: dict) -> "SpanMeta":
        """Inverse of :meth:`to_row`."""
        return cls(str(row["stimulus_id"]), int(row["start"]), int(row["stop"]), str(row["rel"]),
                   str(row["sha256"]), int(row["bytes"]))


def span_folder(root: str | os.PathLike, stimulus_id: str, key: str) -> Path:
    """Folder of a stimulus's spans under one plan key."""
    return Path(root) / SPANS / stimulus_id / key


def write_span(root: str | os.PathLike, stimulus_id: str, key: str, start: int, stop: int,
               arrays: dict[str, np.ndarray]) -> SpanMeta:
    """Write one span atomically (the ``ARRAYS`` of a work item) and return its metadata."""
    missing = [k for k in ARRAYS if k not in arrays]
    if missing:
        raise FeatureStoreError(f"{stimulus_id} span [{start}, {stop}): arrays {missing} missing; expected {ARRAYS}")
    buf = io.BytesIO()
    np.savez(buf, **{k: np.ascontiguousarray(arrays[k]) for k in ARRAYS})
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    path = write_bytes(span_folder(root, stimulus_id, key) / f"{start:06d}-{stop:06d}.{len(data)}.{digest}.npz", data)
    return SpanMeta(stimulus_id, int(start), int(stop), str(path.relative_to(root)), digest, len(data))


def existing_spans(root: str | os.PathLike, stimulus_id: str, key: str) -> dict[tuple[int, int], SpanMeta]:
    """Spans of a stimulus on disk whose size matches their name, by (start, stop); a cut span is removed.

    Only sizes are checked here (no byte is read); :func:`assemble` checks every checksum.
    """
    folder = span_folder(root, stimulus_id, key)
    found: dict[tuple[int, int], SpanMeta] = {}
    if not folder.is_dir():
        return found
    for path in sorted(folder.iterdir()):
        m = _NAME.match(path.name)
        if m is None:
            continue
        start, stop, size, digest = int(m[1]), int(m[2]), int(m[3]), m[4]
        try:
            actual = path.stat().st_size
        except FileNotFoundError:
            continue
        if actual != size:
            path.unlink(missing_ok=True)
            continue
        found[(start, stop)] = SpanMeta(stimulus_id, start, stop, str(path.relative_to(root)), digest, size)
    return found


def _read_span(root: Path, meta: SpanMeta) -> dict[str, np.ndarray] | None:
    """The span's arrays, or None when its bytes do not match its checksum (or it is gone)."""
    try:
        data = (root / meta.rel).read_bytes()
    except FileNotFoundError:
        return None
    if len(data) != meta.bytes or hashlib.sha256(data).hexdigest() != meta.sha256:
        return None
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in ARRAYS}
    except (OSError, ValueError, KeyError):
        return None


def apply_span(arrays: dict[str, np.ndarray], sink) -> None:
    """Set the span's media frames and add its word vectors into their text frames (``sink``: an
    ArrayBuilder or any FeatureSink)."""
    for k, v in zip(arrays["vision_frames"], arrays["vision"]):
        sink.set(MODALITY_AXIS["vision"], int(k), v)
    for k, v in zip(arrays["audio_frames"], arrays["audio"]):
        sink.set(MODALITY_AXIS["audio"], int(k), v)
    for (s, e), v in zip(arrays["text_bins"], arrays["text"]):
        sink.add(MODALITY_AXIS["text"], int(s), int(e), v)


@dataclass
class Assembled:
    """What joining a stimulus's spans gave: ``built`` (to commit), or the spans found corrupt
    (``bad``, already removed: compute them again), or an ``error``."""

    stimulus_id: str
    built: Built | None = None
    bad: list[SpanMeta] = field(default_factory=list)
    error: str = ""


def assemble(root: str | os.PathLike, stimulus_id: str, n_frames: int, frames: dict[str, int],
             spans: list[SpanMeta]) -> Assembled:
    """Join a stimulus's spans into its finished float16 array ``<root>/<id>.npy.tmp-<token>``.

    Every span is read once, checked against its checksum and added (one span in memory at a time);
    corrupt or missing ones are removed and returned in ``bad`` (then nothing is built). The layer
    count and width come from the spans. Runs on any node that mounts the store (a Ray task in the
    distributed runner).
    """
    root = Path(root)
    out = Assembled(stimulus_id)
    builder: ArrayBuilder | None = None
    try:
        for meta in sorted(spans, key=lambda m: (m.start, m.stop)):
            arrays = _read_span(root, meta)
            if arrays is None:
                (root / meta.rel).unlink(missing_ok=True)
                out.bad.append(meta)
            elif not out.bad:
                if builder is None:
                    dims = arrays["vision"].shape[1:]
                    builder = ArrayBuilder(root, stimulus_id, (n_frames, len(MODALITY_AXIS), *dims), frames)
                apply_span(arrays, builder)
        if builder is None and not out.bad:
            out.error = f"{stimulus_id}: no span to assemble; expected one per work item"
        elif builder is not None and not out.bad:
            out.built = builder.finish()
            builder = None
    except FeatureStoreError as e:
        out.error = str(e)
    finally:
        if builder is not None:
            builder.abort()
    return out
