"""The feature store: one directory per extraction key, one float16 array per stimulus.

Layout::

    <features.store>/<key>/manifest.json
    <features.store>/<key>/<stimulus_id>.npy     float16 (n_frames, 3, n_layers, dim)

Axis 1 holds the modalities in the order of ``mirage.config.MODALITIES`` (vision, audio, text), recorded
in the manifest (``modalities``); a store recording another order is refused.
Each modality has its own frame count (text from the transcript's length, audio and vision from
the media's), recorded per stimulus in the manifest (``frames``); ``n_frames`` is the largest and a
modality's rows past its own count are zero. Frame ``k`` of every modality covers the same time
(``k / rate_hz`` seconds), so slicing rows by time and zero-padding is the reference's
per-modality slicing.
The key hashes backbone id + revision + every extraction parameter, so features written with
other parameters live elsewhere; a manifest whose parameters differ from the config is refused.
Arrays appear atomically (written to a temporary name, fsynced, renamed) and are recorded in the
manifest (shape, checksum) only after the rename: a stimulus counts as stored when both exist.
Recomputing a stored stimulus (``--overwrite``) replaces it at commit: its old array stays readable
until the new one is complete, then the rename swaps it in. The manifest names the swap under
``replacing`` before the rename and records the new entry after it, so a writer opened after a crash
between the two steps settles the entry from the file's checksum.
A writer that records no stimulus removes the manifest, lease and directories it created.

One writer at a time: a :class:`~mirage.features.lease.Lease` on ``<key>/.lease`` (a file, so it
holds across the nodes sharing the volume), renewed while the writer is open; a writer that lost
it commits nothing more. Extraction runners write spans of a stimulus under ``<key>/.spans``
(:mod:`mirage.features.spans`) from any node; an :class:`ArrayBuilder` joins them into
``<id>.npy.tmp-<token>`` wherever it runs, and the writer renames that into place and records it
(:meth:`StoreWriter.commit_built`), reading no feature bytes itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mirage.atomic import write_text
from mirage.config import MODALITIES, FeaturesConfig
from mirage.documents import read_mapping
from mirage.errors import FeatureStoreError
from mirage.features.backbone import BACKBONES
from mirage.features.lease import Lease

SPANS = ".spans"

MANIFEST = "manifest.json"
FORMAT_VERSION = 2
_PARAM_FIELDS = (
    "backbone", "model_id", "revision", "fusion", "rate_hz", "video_seconds", "video_fps", "max_frames",
    "video_min_pixels", "video_max_pixels",
    "audio_seconds", "audio_rate", "audio_decode_rate", "max_words", "transcript_tr", "dtype",
)


def extraction_params(cfg: FeaturesConfig) -> dict[str, Any]:
    """Every setting that changes the stored numbers (the tiny backbone's sizes included)."""
    params: dict[str, Any] = {f: getattr(cfg, f) for f in _PARAM_FIELDS}
    entry = BACKBONES.get(cfg.backbone)
    if entry is not None and entry.builds_locally:  # a tiny random variant: its sizes are its weights
        params["tiny"] = cfg.tiny.model_dump(mode="json")
    params["format"] = FORMAT_VERSION
    return params


def store_key(cfg: FeaturesConfig) -> str:
    """``<backbone>-<12 hex>``: a hash of backbone id + revision + extraction parameters."""
    blob = json.dumps(extraction_params(cfg), sort_keys=True, separators=(",", ":"))
    return f"{cfg.backbone}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def store_path(cfg: FeaturesConfig) -> Path:
    """Directory of the store for this config (``cfg.store`` must be resolved)."""
    if not cfg.store:
        raise FeatureStoreError("features.store is empty; expected a directory (run resolve_paths on the config)")
    return Path(cfg.store) / store_key(cfg)


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape the features."""
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "tokenizers", "numpy", "av", "julius", "mirage-platform"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "absent"
    return out


def _write_json_atomic(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=1, sort_keys=True))


class FeatureStore:
    """Read access to one store directory (``<features.store>/<key>``); arrays are memory-mapped."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        path = self.root / MANIFEST
        self.manifest: dict[str, Any] = read_mapping(
            path, FeatureStoreError, f"{self.root}: no {MANIFEST}; expected a feature store written by `mirage extract`"
        )
        _check_modalities(path, self.manifest)
        self.key: str = self.manifest.get("key", self.root.name)
        self._maps: dict[str, np.memmap] = {}
        self._views: dict[str, np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_maps"], state["_views"] = {}, {}  # maps reopen lazily; never pickle mapped data
        return state

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.root)!r}, {len(self.stimuli())} stimuli)"

    # --- facts

    @property
    def rate_hz(self) -> float:
        """Feature frames per second."""
        return float(self.manifest["rate_hz"])

    @property
    def n_layers(self) -> int:
        """Hidden states per modality (embeddings + every layer)."""
        return int(self._shape_fact("n_layers"))

    @property
    def dim(self) -> int:
        """Feature width."""
        return int(self._shape_fact("dim"))

    @property
    def params(self) -> dict[str, Any]:
        """Extraction parameters the store was written with."""
        return dict(self.manifest["params"])

    def _shape_fact(self, name: str) -> int:
        value = self.manifest.get(name)
        if value is None:
            raise FeatureStoreError(f"{self.root}: the store holds no stimulus yet, so {name} is unknown")
        return value

    def stimuli(self) -> list[str]:
        """Stored stimulus ids, sorted."""
        return sorted(self.manifest.get("stimuli", {}))

    def has(self, stimulus_id: str) -> bool:
        """Whether the stimulus is recorded in the manifest and its file exists."""
        return stimulus_id in self.manifest.get("stimuli", {}) and self.path(stimulus_id).is_file()

    def path(self, stimulus_id: str) -> Path:
        """File of a stimulus."""
        return self.root / f"{stimulus_id}.npy"

    def n_frames(self, stimulus_id: str) -> int:
        """Feature frames of a stored stimulus (the largest of its modalities' counts)."""
        return int(self._entry(stimulus_id)["shape"][0])

    def modality_frames(self, stimulus_id: str) -> dict[str, int]:
        """Frames of each modality of a stored stimulus; rows past a modality's count are zero."""
        entry = self._entry(stimulus_id)
        n = int(entry["shape"][0])
        return {m: int(entry.get("frames", {}).get(m, n)) for m in MODALITIES}

    def _entry(self, stimulus_id: str) -> dict[str, Any]:
        entry = self.manifest.get("stimuli", {}).get(stimulus_id)
        if entry is None:
            raise FeatureStoreError(
                f"{self.root}: stimulus {stimulus_id!r} is not in the store (has {len(self.stimuli())} stimuli); "
                "run `mirage extract` for it"
            )
        return entry

    # --- reading

    def read(self, stimulus_id: str) -> np.memmap:
        """Memory-mapped float16 (n_frames, 3, n_layers, dim); nothing is read until indexed.

        The map is opened once per stimulus and kept (training reads many windows of each run).
        """
        cached = self._maps.get(stimulus_id)
        if cached is not None:
            return cached
        entry = self._entry(stimulus_id)
        path = self.path(stimulus_id)
        try:
            arr = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise FeatureStoreError(f"{path}: unreadable feature file ({e})") from None
        if list(arr.shape) != list(entry["shape"]) or arr.dtype != np.float16:
            raise FeatureStoreError(
                f"{path}: shape {arr.shape} {arr.dtype}, the manifest says {tuple(entry['shape'])} float16"
            )
        self._maps[stimulus_id] = arr
        return arr

    def read_window(self, stimulus_id: str, start: int, stop: int, layers: list[int] | None = None) -> np.ndarray:
        """Frames [start, stop) as float16 (stop - start, 3, n_layers', dim), zeros outside the run.

        ``layers`` selects hidden states (indices into the layer axis); None keeps all.
        """
        arr = self._views.get(stimulus_id)
        if arr is None:
            arr = self._views[stimulus_id] = self.read(stimulus_id).view(np.ndarray)  # no memmap overhead per slice
        n = arr.shape[0]
        lo, hi = min(max(start, 0), n), max(min(stop, n), 0)
        if start >= 0 and stop <= n and layers is None:
            return np.array(arr[start:stop])  # inside the run: one copy out of the map
        n_l = arr.shape[2] if layers is None else len(layers)
        out = np.zeros((stop - start, 3, n_l, arr.shape[3]), dtype=np.float16)  # (T, 3, L, D)
        if hi > lo:
            out[lo - start: hi - start] = arr[lo:hi] if layers is None else arr[lo:hi][:, :, layers]
        return out

    # --- checking

    def verify(self, check_sums: bool = True) -> dict[str, str]:
        """Check every recorded stimulus against the manifest; returns {stimulus_id: problem}."""
        problems: dict[str, str] = {}
        for sid, entry in self.manifest.get("stimuli", {}).items():
            path = self.path(sid)
            if not path.is_file():
                problems[sid] = f"{path}: missing"
                continue
            try:
                arr = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as e:
                problems[sid] = f"{path}: unreadable ({e})"
                continue
            frames = entry.get("frames", {})
            if list(arr.shape) != list(entry["shape"]) or arr.dtype != np.float16:
                problems[sid] = f"{path}: shape {arr.shape} {arr.dtype}, expected {tuple(entry['shape'])} float16"
            elif any(not 0 <= int(v) <= arr.shape[0] for v in frames.values()):
                problems[sid] = f"{path}: modality frame counts {frames} outside [0, {arr.shape[0]}]"
            elif check_sums and file_sha256(path) != entry["sha256"]:
                problems[sid] = f"{path}: checksum differs from the manifest"
        for tmp in self.root.glob("*.tmp-*"):
            problems[tmp.name] = f"{tmp}: leftover partial file"
        for sid in self.manifest.get("replacing", {}):
            problems[sid] = f"{self.path(sid)}: replacement cut short; run `mirage extract` to settle it"
        if not self.manifest.get("stimuli"):
            problems[MANIFEST] = (
                f"{self.root / MANIFEST}: the store holds no stimulus; expected at least one (run `mirage extract`)"
            )
        return problems


class StoreWriter:
    """The single writer of a store directory: creates the manifest and adds arrays atomically.

    Holds the store's lease (``<store>/.lease``, ``cfg.lease_seconds``, renewed in the background)
    until closed or dropped, so two extraction jobs, on one node or several, never write one store
    at once; a writer whose lease was taken over refuses to commit.
    """

    def __init__(self, cfg: FeaturesConfig):
        self.cfg = cfg
        self.root = store_path(cfg)
        self._made_dirs = [p for p in (self.root, *self.root.parents) if not p.exists()]  # deepest first
        self._made_manifest = False
        self._open_parts: dict[int, PartialWrite] = {}  # begun, neither committed nor aborted
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self._lease: Lease | None = Lease(
                self.root, cfg.lease_seconds, f"{self.root}: another extraction is writing this store",
                FeatureStoreError,
            )
        except BaseException:
            self._lease = None
            self._remove_made_dirs()
            raise
        try:
            self._open_manifest(cfg)
            self._settle_replacements()
        except BaseException:
            self.close()
            raise
        for tmp in (*self.root.glob("*.tmp-*"), *self.root.glob(f"{SPANS}/*/*/*.tmp-*")):  # an interrupted run's
            tmp.unlink(missing_ok=True)

    def _open_manifest(self, cfg: FeaturesConfig) -> None:
        params = extraction_params(cfg)
        path = self.root / MANIFEST
        if path.is_file():
            self.manifest = FeatureStore(self.root).manifest
            _check_params(self.root, self.manifest, params)
        else:
            self.manifest = {
                "key": self.root.name,
                "backbone": cfg.backbone,
                "model_id": cfg.model_id,
                "revision": cfg.revision,
                "params": params,
                "rate_hz": cfg.rate_hz,
                "dtype": "float16",
                "modalities": list(MODALITIES),
                "n_layers": None,
                "dim": None,
                "libraries": library_versions(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "stimuli": {},
            }
            _write_json_atomic(path, self.manifest)
            self._made_manifest = True

    def _settle_replacements(self) -> None:
        """Finish or undo a replacement cut short between the rename and the manifest update."""
        replacing = self.manifest.pop("replacing", None)
        if not replacing:
            return
        for sid, new in replacing.items():
            path = self.root / f"{sid}.npy"
            digest = file_sha256(path) if path.is_file() else None
            old = self.manifest["stimuli"].get(sid)
            if digest == new["sha256"]:
                self.manifest["stimuli"][sid] = new
            elif old is None or digest != old["sha256"]:
                self.manifest["stimuli"].pop(sid, None)  # neither version on disk: recomputed by the next run
        _write_json_atomic(self.root / MANIFEST, self.manifest)

    def close(self) -> None:
        """Drop unfinished partial writes and release the store's lease; a store this writer created
        and left empty is removed."""
        if self._lease is None or self._lease.released:
            return
        for part in list(self._open_parts.values()):
            part.abort()
        if not self._lease.held:  # another writer owns the store now: leave its files alone
            self._lease.release()
            return
        with contextlib.suppress(OSError):
            (self.root / SPANS).rmdir()  # only while no span is kept for a resume
        if self._made_manifest and not self.manifest["stimuli"]:
            (self.root / MANIFEST).unlink(missing_ok=True)
            self._lease.release()
            self._remove_made_dirs()
            return
        self._lease.release()

    def _remove_made_dirs(self) -> None:
        for d in self._made_dirs:
            try:
                d.rmdir()  # only while empty
            except OSError:
                break

    @property
    def lease_held(self) -> bool:
        """This writer is open and has not lost the store's lease."""
        return self._lease is not None and self._lease.held

    def check_lease(self) -> None:
        """Raise FeatureStoreError unless this writer still holds the store's lease."""
        if self._lease is None:
            raise FeatureStoreError(f"{self.root}: the writer holds no lease; expected an open writer")
        self._lease.check()

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def store(self) -> FeatureStore:
        """A reader of the current state."""
        return FeatureStore(self.root)

    def has(self, stimulus_id: str) -> bool:
        """Recorded in the manifest and present on disk."""
        return stimulus_id in self.manifest["stimuli"] and (self.root / f"{stimulus_id}.npy").is_file()

    def write(self, stimulus_id: str, features: np.ndarray, frames: dict[str, int] | None = None) -> Path:
        """Store (n_frames, 3, n_layers, dim) as float16 atomically, then record it in the manifest.

        ``frames``: each modality's own frame count (default: ``n_frames`` for all).
        """
        features = np.asarray(features)
        part = self.begin(stimulus_id, features.shape, frames)
        try:
            part.put(0, features)
        except BaseException:
            part.abort()
            raise
        return part.commit()

    def begin(self, stimulus_id: str, shape: tuple[int, ...], frames: dict[str, int] | None = None) -> "PartialWrite":
        """Start writing a stimulus span by span into a temporary file (bounded memory).

        ``frames``: each modality's own frame count, at most ``shape[0]`` (default: all ``shape[0]``).
        """
        shape, frames = check_layout(stimulus_id, shape, frames)
        self._check_dims(stimulus_id, shape)
        part = PartialWrite(self, stimulus_id, shape, frames)
        self._open_parts[id(part)] = part
        return part

    def _check_dims(self, stimulus_id: str, shape: tuple[int, ...]) -> None:
        for name, value in (("n_layers", shape[2]), ("dim", shape[3])):
            known = self.manifest.get(name)
            if known is not None and known != value:
                raise FeatureStoreError(f"{stimulus_id}: {name}={value}, but the store at {self.root} has {known}")

    def commit_built(self, built: "Built") -> Path:
        """Rename an array an :class:`ArrayBuilder` finished (here or on another node) into place and
        record it; its checksum comes from the builder, so no feature byte is read here."""
        tmp = self.root / built.tmp
        try:
            if Path(built.tmp).name != built.tmp or not built.tmp.startswith(f"{built.stimulus_id}.npy.tmp-"):
                raise FeatureStoreError(f"{built.tmp!r}: expected the file name <id>.npy.tmp-* in the store {self.root}")
            size = tmp.stat().st_size if tmp.is_file() else None
            if size != built.bytes:
                raise FeatureStoreError(
                    f"{tmp}: {'missing' if size is None else f'{size} bytes'}, the builder wrote {built.bytes}"
                )
            self._check_dims(built.stimulus_id, built.shape)
            return self._swap_in(built.stimulus_id, tmp, built.shape, built.frames, built.sha256)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _swap_in(
        self, stimulus_id: str, tmp: Path, shape: tuple[int, ...], frames: dict[str, int], sha256: str
    ) -> Path:
        """Rename the finished ``tmp`` onto the stimulus's file and record it in the manifest.

        A stored stimulus stays readable until the rename; its swap is named in the manifest first.
        Refused when this writer lost the store's lease.
        """
        self.check_lease()
        path = self.root / f"{stimulus_id}.npy"
        entry = {"shape": list(shape), "frames": dict(frames), "sha256": sha256, "bytes": tmp.stat().st_size}
        replacing = stimulus_id in self.manifest["stimuli"]
        if replacing:
            self.manifest.setdefault("replacing", {})[stimulus_id] = entry
            _write_json_atomic(self.root / MANIFEST, self.manifest)
        os.replace(tmp, path)
        self.manifest["n_layers"], self.manifest["dim"] = int(shape[2]), int(shape[3])
        self.manifest["stimuli"][stimulus_id] = entry
        if replacing:
            self.manifest["replacing"].pop(stimulus_id)
            if not self.manifest["replacing"]:
                del self.manifest["replacing"]
        _write_json_atomic(self.root / MANIFEST, self.manifest)
        return path


def check_layout(stimulus_id: str, shape, frames: dict[str, int] | None) -> tuple[tuple[int, ...], dict[str, int]]:
    """(shape, frames) of a stimulus checked: (n_frames, 3, n_layers, dim) and each modality's frame
    count in [0, n_frames] with the largest n_frames (default: all n_frames)."""
    shape = tuple(int(x) for x in shape)
    if len(shape) != 4 or shape[1] != len(MODALITIES):
        raise FeatureStoreError(f"{stimulus_id}: features of shape {shape}, expected (n_frames, 3, n_layers, dim)")
    frames = {m: int((frames or {}).get(m, shape[0])) for m in MODALITIES}
    if any(not 0 <= v <= shape[0] for v in frames.values()) or (shape[0] and max(frames.values()) != shape[0]):
        raise FeatureStoreError(
            f"{stimulus_id}: modality frame counts {frames}, expected each in [0, {shape[0]}] and the largest {shape[0]}"
        )
    return shape, frames


@dataclass(frozen=True)
class Built:
    """A finished array waiting to be renamed into place: ``tmp`` (a file name in the store directory)
    holds float16 ``shape``; its file has ``sha256`` and ``bytes``."""

    stimulus_id: str
    tmp: str
    shape: tuple[int, ...]
    frames: dict[str, int]
    sha256: str
    bytes: int


class ArrayBuilder:
    """The array of one stimulus being assembled in ``root`` (the store directory), on any node.

    Features gather in a float32 scratch file ``<id>.f32.tmp-<token>``; :meth:`finish` casts them to
    float16 into ``<id>.npy.tmp-<token>``, fsyncs it and returns its :class:`Built` (the writer then
    renames it into place). The token names host, pid and a random part, so builders on several
    nodes never share a file.
    """

    def __init__(self, root: str | os.PathLike, stimulus_id: str, shape, frames: dict[str, int] | None = None):
        self.shape, self.frames = check_layout(stimulus_id, shape, frames)
        self.root, self.stimulus_id = Path(root), stimulus_id
        token = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.tmp = self.root / f"{stimulus_id}.npy.tmp-{token}"
        self.scratch = self.root / f"{stimulus_id}.f32.tmp-{token}"
        self._arr = np.lib.format.open_memmap(self.scratch, mode="w+", dtype=np.float32, shape=self.shape)  # zeros

    def put(self, start: int, features: np.ndarray) -> None:
        """Write frames [start, start + len(features)) of every modality; (n, 3, n_layers, dim)."""
        features = np.asarray(features)
        if features.ndim != 4 or features.shape[1:] != self.shape[1:] or start < 0 or start + len(features) > self.shape[0]:
            raise FeatureStoreError(
                f"{self.stimulus_id}: span of shape {features.shape} at frame {start} does not fit {self.shape}"
            )
        self._check_finite(features)
        self._arr[start: start + len(features)] = features

    def set(self, modality: int, frame: int, vector: np.ndarray) -> None:
        """Frame ``frame`` of modality ``modality`` (index into MODALITIES) = vector (n_layers, dim)."""
        self._check_rows(modality, frame, frame + 1, vector)
        self._arr[frame, modality] = vector

    def add(self, modality: int, start: int, stop: int, vector: np.ndarray) -> None:
        """Frames [start, stop) of a modality += vector (n_layers, dim) (words summed into text bins)."""
        self._check_rows(modality, start, stop, vector)
        self._arr[start:stop, modality] += np.asarray(vector, np.float32)[None]

    def _check_rows(self, modality: int, start: int, stop: int, vector: np.ndarray) -> None:
        m = MODALITIES[modality]
        if not 0 <= start < stop <= self.frames[m] or np.shape(vector) != self.shape[2:]:
            raise FeatureStoreError(
                f"{self.stimulus_id}: {m} frames [{start}, {stop}) of shape {np.shape(vector)} do not fit "
                f"{self.frames[m]} frames of {self.shape[2:]}"
            )
        self._check_finite(vector)

    def _check_finite(self, x: np.ndarray) -> None:
        if not np.isfinite(x).all():
            raise FeatureStoreError(f"{self.stimulus_id}: features hold NaN or inf; not stored")

    def finish(self) -> Built:
        """Cast to float16 into the temporary array file and fsync it; the scratch file is removed."""
        out = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=np.float16, shape=self.shape)
        step = max(1, (1 << 26) // max(1, int(np.prod(self.shape[1:]))))  # ~256 MB of float32 per block
        for lo in range(0, self.shape[0], step):
            with np.errstate(over="ignore"):
                block = self._arr[lo: lo + step].astype(np.float16)
            if not np.isfinite(block).all():
                del out
                self.abort()
                raise FeatureStoreError(
                    f"{self.stimulus_id}: features overflow float16 (|x| > 65504) in frames [{lo}, {lo + step}); not stored"
                )
            out[lo: lo + step] = block
        out.flush()
        del out
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())
        self._drop_scratch()
        return Built(self.stimulus_id, self.tmp.name, self.shape, dict(self.frames), file_sha256(self.tmp),
                     self.tmp.stat().st_size)

    def _drop_scratch(self) -> None:
        self.__dict__.pop("_arr", None)
        self.scratch.unlink(missing_ok=True)

    def abort(self) -> None:
        """Drop the temporary files."""
        self._drop_scratch()
        self.tmp.unlink(missing_ok=True)


class PartialWrite(ArrayBuilder):
    """A stimulus being written by this process's :class:`StoreWriter`: an :class:`ArrayBuilder` whose
    ``commit`` finishes it and renames it into place (over a stored version of the stimulus, which
    stays readable until then)."""

    def __init__(self, writer: StoreWriter, stimulus_id: str, shape: tuple[int, ...], frames: dict[str, int]):
        super().__init__(writer.root, stimulus_id, shape, frames)
        self.writer = writer
        self.path = writer.root / f"{stimulus_id}.npy"

    def commit(self) -> Path:
        """Cast to float16, fsync, rename into place, record in the manifest."""
        try:
            built = self.finish()
            return self.writer.commit_built(built)
        finally:
            self.writer._open_parts.pop(id(self), None)

    def abort(self) -> None:
        """Drop the temporary files."""
        super().abort()
        self.writer._open_parts.pop(id(self), None)


def remove_spans(root: str | os.PathLike, stimulus_id: str) -> None:
    """Drop every span kept for a stimulus (``<root>/.spans/<id>``)."""
    shutil.rmtree(Path(root) / SPANS / stimulus_id, ignore_errors=True)


def _check_modalities(path: Path, manifest: dict[str, Any]) -> None:
    """The store's modality axis must be ``MODALITIES``: arrays are indexed by it, never by the manifest."""
    stored = manifest.get("modalities")
    if stored != list(MODALITIES):
        raise FeatureStoreError(
            f"{path}: modality axis {stored}; expected {list(MODALITIES)} (mirage.config.MODALITIES). "
            f"Remove {path.parent} and run `mirage extract` again."
        )


def _check_params(root: Path, manifest: dict[str, Any], params: dict[str, Any]) -> None:
    stored = manifest.get("params")
    if stored != params:
        diff = sorted(k for k in set(stored or {}) | set(params) if (stored or {}).get(k) != params.get(k))
        raise FeatureStoreError(
            f"{root}: written with other extraction parameters (differ in {diff}); "
            "refusing to mix features. Expected a store whose manifest matches the config."
        )


def open_store(cfg: FeaturesConfig, must_exist: bool = True) -> FeatureStore | None:
    """The store of this config, checked against its parameters; None if absent and not ``must_exist``."""
    root = store_path(cfg)
    if not (root / MANIFEST).is_file():
        if must_exist:
            raise FeatureStoreError(
                f"{root}: no feature store for key {root.name} (backbone {cfg.backbone}); run `mirage extract` first"
            )
        return None
    store = FeatureStore(root)
    _check_params(root, store.manifest, extraction_params(cfg))
    return store
