"""Training samples: feature-store windows paired with z-scored fMRI windows.

A :class:`WindowDataset` indexes every window of a split without reading any array
(each run's length is first reconciled with its stimulus' by the rule of ``data check``,
:func:`mirage.data.windows.run_windows`); a window is read on demand: its feature rows from the store's memory map (float16,
zero rows past the stimulus edges) and its fMRI rows from its run, z-scored per parcel
over the whole run (a few runs are kept in a small cache). :func:`epoch_plan` cuts an
epoch into per-rank batches; :class:`PrefetchLoader` builds the next batches on
background threads while the current step runs.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import h5py
import numpy as np

from mirage.config import MODALITIES, Config, ConfigError
from mirage.data.fmri import load_fmri, zscore
from mirage.data.layout import Release
from mirage.data.media import MediaReader
from mirage.data.splits import split_runs
from mirage.data.windows import run_windows
from mirage.errors import DataError, FeatureStoreError
from mirage.train.batch import HostBatch


@dataclass(frozen=True)
class WindowRef:
    """One sample: a window of one fMRI run of one subject."""

    subject_index: int
    fmri_path: str
    fmri_key: str
    stimulus_id: str
    n_trs: int
    tr_start: int
    frame_start: int
    frame_stop: int
    mask: tuple[bool, ...]  # (window_trs,)

    @property
    def n_valid(self) -> int:
        return int(sum(self.mask))


def _fmri_shape(path: str, key: str) -> tuple[int, ...]:
    try:
        with h5py.File(path, "r") as f:
            return tuple(f[key].shape)
    except (OSError, KeyError) as e:
        raise DataError(f"{path}: cannot read fMRI dataset {key!r} ({e}); expected a 2-D (n_trs, n_parcels) array") from None


def selected_layers(cfg: Config, n_layers: int) -> list[int]:
    """Store layer indices fed to the model (``cfg.model.layers``; None = all), validated."""
    layers = list(range(n_layers)) if cfg.model.layers is None else list(cfg.model.layers)
    bad = [i for i in layers if not -n_layers <= i < n_layers]
    if bad or not layers:
        raise FeatureStoreError(
            f"model.layers={cfg.model.layers}: the feature store holds {n_layers} layers (indices 0..{n_layers - 1})"
        )
    return [i % n_layers for i in layers]


class WindowDataset:
    """Every window of one split; arrays are read only when a window is loaded.

    Args:
        cfg: resolved config (``data``, ``features``, ``model.layers``).
        split: ``"train"`` or ``"val"``.
        store: an open feature store (``mirage.features.store.open_store(cfg.features)``).
    """

    def __init__(self, cfg: Config, split: str, store, cache_runs: int = 8):
        self.cfg = cfg
        self.split = split
        self.store = store
        self.layers = selected_layers(cfg, store.n_layers)
        self.window_trs = cfg.data.window_trs
        self.refs: list[WindowRef] = []
        self.n_parcels: int | None = None
        subjects = list(cfg.data.subjects)
        release = Release(cfg.data.root)
        stimuli = release.stimuli()
        lengths: dict[str, float] = {}  # stimulus id -> seconds
        for run in split_runs(release, cfg.data, split):
            if run.subject not in subjects:
                continue
            if not store.has(run.stimulus_id):
                raise FeatureStoreError(
                    f"feature store {store.key}: no features for stimulus {run.stimulus_id!r} "
                    f"(needed by {run.subject} {run.key}); run `mirage extract` first"
                )
            shape = _fmri_shape(str(run.path), run.key)
            if len(shape) != 2:
                raise DataError(f"{run.path}:{run.key}: expected (n_trs, n_parcels), got shape {shape}")
            if self.n_parcels is None:
                self.n_parcels = shape[1]
            elif shape[1] != self.n_parcels:
                raise DataError(f"{run.path}:{run.key}: {shape[1]} parcels, other runs have {self.n_parcels}")
            if run.stimulus_id not in lengths:
                with MediaReader(stimuli[run.stimulus_id].video) as movie:
                    lengths[run.stimulus_id] = movie.length_s
            n_frames = store.n_frames(run.stimulus_id)
            where = f"{run.path}: key {run.key!r}"
            for w in run_windows(shape[0], lengths[run.stimulus_id], cfg.data, store.rate_hz, n_frames, where):
                self.refs.append(
                    WindowRef(
                        subject_index=subjects.index(run.subject),
                        fmri_path=str(run.path),
                        fmri_key=run.key,
                        stimulus_id=run.stimulus_id,
                        n_trs=shape[0],
                        tr_start=w.tr_start,
                        frame_start=w.frame_start,
                        frame_stop=w.frame_stop,
                        mask=tuple(bool(v) for v in np.asarray(w.mask)),
                    )
                )
        self._cache: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._cache_size = cache_runs
        self._lock = threading.Lock()
        self._maps: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.refs)

    @property
    def frames_per_window(self) -> int:
        return self.refs[0].frame_stop - self.refs[0].frame_start if self.refs else 0

    def feature_dims(self) -> dict[str, tuple[int, int]]:
        """modality -> (n_layers fed to the model, dim)."""
        return {m: (len(self.layers), self.store.dim) for m in MODALITIES}

    def _run_fmri(self, path: str, key: str) -> np.ndarray:
        """(n_trs, n_parcels) float32, z-scored per parcel when ``data.zscore``."""
        k = (path, key)
        with self._lock:
            if k in self._cache:
                self._cache.move_to_end(k)
                return self._cache[k]
        x = load_fmri(path, key)
        x = zscore(x) if self.cfg.data.zscore else x.astype(np.float32)
        with self._lock:
            self._cache[k] = x
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return x

    def _features(self, stimulus_id: str) -> np.ndarray:
        arr = self._maps.get(stimulus_id)
        if arr is None:
            arr = self._maps[stimulus_id] = self.store.read(stimulus_id)
        return arr

    def load(self, i: int, real: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """Window ``i``: features (T, 3, L, D) float16, fmri (window_trs, P) float32, mask (window_trs,) bool, subject.

        ``real=False`` returns the window with an all-False mask (padding that evens out ranks).
        """
        ref = self.refs[i]
        arr = self._features(ref.stimulus_id)  # (n_frames, 3, L_store, D) memmap
        n_frames = arr.shape[0]
        feats = np.zeros((ref.frame_stop - ref.frame_start, arr.shape[1], len(self.layers), arr.shape[3]), np.float16)
        lo, hi = max(ref.frame_start, 0), min(ref.frame_stop, n_frames)
        if hi > lo:
            block = np.asarray(arr[lo:hi])  # (hi - lo, 3, L_store, D): one contiguous read
            feats[lo - ref.frame_start : hi - ref.frame_start] = block[:, :, self.layers]
        mask = np.array(ref.mask, dtype=bool) & real
        y = self._run_fmri(ref.fmri_path, ref.fmri_key)
        fmri = np.zeros((self.window_trs, y.shape[1]), np.float32)
        rows = ref.tr_start + np.arange(self.window_trs)
        ok = np.array(ref.mask, dtype=bool) & (rows >= 0) & (rows < y.shape[0])
        fmri[ok] = y[rows[ok]]
        return feats, fmri, mask, ref.subject_index

    def batch(self, items: list[tuple[int, bool]]) -> HostBatch:
        """Stack windows ``[(index, real), ...]`` into a :class:`HostBatch`."""
        parts = [self.load(i, real) for i, real in items]
        return HostBatch(
            features=np.stack([p[0] for p in parts]),  # (B, T, 3, L, D)
            fmri=np.stack([p[1] for p in parts]),  # (B, window_trs, P)
            mask=np.stack([p[2] for p in parts]),  # (B, window_trs)
            subject_id=np.array([p[3] for p in parts], dtype=np.int64),  # (B,)
        )


@dataclass
class EpochPlan:
    """This rank's batches of one epoch, and what each stands for globally.

    Attributes:
        batches: per step, ``[(window index, real), ...]`` for this rank.
        cells: per step, real (row, parcel) cells of the whole global batch, over all ranks.
    """

    batches: list[list[tuple[int, bool]]]
    cells: list[int]


def epoch_plan(
    refs: list[WindowRef],
    n_parcels: int,
    global_batch: int,
    rank: int,
    world_size: int,
    *,
    shuffle: bool,
    seed: int,
    epoch: int,
) -> EpochPlan:
    """Split an epoch over ``refs`` into global batches of ``global_batch`` windows, dealt round-robin to ranks.

    Training (``shuffle``): a permutation seeded by (seed, epoch), identical on every rank,
    wrapped around so the last global batch is full. Evaluation: windows in order, and ranks
    that run out get padding windows (mask all False) so that every rank runs the same number of
    forward passes (FSDP gathers parameters collectively).
    """
    n = len(refs)
    if n == 0:
        return EpochPlan([], [])
    if global_batch < world_size:
        raise ConfigError(f"train.batch_size={global_batch} is smaller than the {world_size} workers")
    steps = math.ceil(n / global_batch)
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(n)
        order = np.resize(order, steps * global_batch)
        real = np.ones(len(order), bool)
    else:
        order = np.resize(np.arange(n), steps * global_batch)
        real = np.arange(len(order)) < n
    batches, cells = [], []
    for s in range(steps):
        g = slice(s * global_batch, (s + 1) * global_batch)
        idx, ok = order[g], real[g]
        cells.append(int(sum(refs[i].n_valid for i, r in zip(idx, ok) if r)) * n_parcels)
        batches.append([(int(i), bool(r)) for i, r in zip(idx[rank::world_size], ok[rank::world_size])])
    return EpochPlan(batches, cells)


class PrefetchLoader:
    """Iterate ``build(item)`` over ``items`` in order, built ahead on ``threads`` background threads.

    ``threads == 0`` builds synchronously. :attr:`wait_s` accumulates the time the consumer
    spent blocked waiting for a batch; :attr:`bytes` the bytes delivered.
    """

    def __init__(self, build: Callable[[list], HostBatch], items: list, threads: int, depth: int | None = None):
        self.build = build
        self.items = items
        self.threads = threads
        self.depth = depth if depth is not None else max(2, 2 * threads)
        self.wait_s = 0.0
        self.bytes = 0

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[HostBatch]:
        if self.threads == 0:
            for item in self.items:
                t0 = time.perf_counter()
                hb = self.build(item)
                self.wait_s += time.perf_counter() - t0
                self.bytes += hb.nbytes
                yield hb
            return
        with ThreadPoolExecutor(self.threads, thread_name_prefix="mirage-loader") as pool:
            pending: deque = deque()
            it = iter(self.items)
            for item in it:
                pending.append(pool.submit(self.build, item))
                if len(pending) >= self.depth:
                    break
            while pending:
                t0 = time.perf_counter()
                hb = pending.popleft().result()
                self.wait_s += time.perf_counter() - t0
                nxt = next(it, None)
                if nxt is not None:
                    pending.append(pool.submit(self.build, nxt))
                self.bytes += hb.nbytes
                yield hb
