"""Training samples: feature-store windows paired with z-scored fMRI windows.

A :class:`WindowDataset` indexes every window of a split without reading any array
(each run's length is first reconciled with its stimulus' by the rule of ``data check``,
:func:`mirage.data.windows.run_windows`); a window is read on demand: its feature rows from the store's memory map (float16,
zero rows past the stimulus edges) and its fMRI rows from its run, z-scored per parcel
over the whole run (a few runs are kept in a small cache). With ``train.input: resident`` the
training split keeps this rank's shard of windows in memory instead (:class:`ResidentShard`,
loaded once; windows are sliced there). :func:`epoch_plan` cuts an epoch into per-rank batches
(:func:`sharded_epoch_plan` when every rank draws from its own shard); :class:`PrefetchLoader`
builds the next batches on background threads while the current step runs.
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
        cfg: resolved config (``data``, ``features``, ``model.layers``, ``train.input``).
        split: ``"train"`` or ``"val"``.
        store: an open feature store (``mirage.features.store.open_store(cfg.features)``).
        rank, world_size: this rank and the number of ranks; with ``train.input: resident`` the
            training split loads the shard of ``rank`` (:func:`shard_sizes`) into memory.
    """

    def __init__(self, cfg: Config, split: str, store, cache_runs: int = 8, rank: int = 0, world_size: int = 1):
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
        self.rank, self.world_size = rank, world_size
        self.owner: np.ndarray | None = None  # (n_windows,) rank holding each window, when ranks own shards
        self.resident: ResidentShard | None = None
        if split == "train" and cfg.train.input == "resident" and self.refs:
            self.owner = shard_owner(self.refs, cfg.train.batch_size, world_size)
            self.resident = ResidentShard(self, np.flatnonzero(self.owner == rank).tolist())
            self._cache_size = max(cache_runs, len({(r.fmri_path, r.fmri_key) for r in self.resident.refs}))

    def plan(self, global_batch: int, *, shuffle: bool, seed: int, epoch: int) -> EpochPlan:
        """This rank's batches of one epoch: :func:`sharded_epoch_plan` when resident, else :func:`epoch_plan`."""
        if self.owner is not None and shuffle:
            return sharded_epoch_plan(self.refs, self.n_parcels or 0, global_batch, self.rank, self.owner,
                                      self.world_size, seed=seed, epoch=epoch)
        return epoch_plan(self.refs, self.n_parcels or 0, global_batch, self.rank, self.world_size,
                          shuffle=shuffle, seed=seed, epoch=epoch)

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
        if self.resident is not None:
            feats = self.resident.features(i)
            return (feats, *self._fmri_window(ref, real), ref.subject_index)
        arr = self._features(ref.stimulus_id)  # (n_frames, 3, L_store, D) memmap
        n_frames = arr.shape[0]
        feats = np.zeros((ref.frame_stop - ref.frame_start, arr.shape[1], len(self.layers), arr.shape[3]), np.float16)
        lo, hi = max(ref.frame_start, 0), min(ref.frame_stop, n_frames)
        if hi > lo:
            block = np.asarray(arr[lo:hi])  # (hi - lo, 3, L_store, D): one contiguous read
            feats[lo - ref.frame_start : hi - ref.frame_start] = block[:, :, self.layers]
        return (feats, *self._fmri_window(ref, real), ref.subject_index)

    def _fmri_window(self, ref: WindowRef, real: bool) -> tuple[np.ndarray, np.ndarray]:
        """fmri (window_trs, P) float32 (0 on padded rows) and mask (window_trs,) bool of ``ref``."""
        mask = np.array(ref.mask, dtype=bool) & real
        y = self._run_fmri(ref.fmri_path, ref.fmri_key)
        fmri = np.zeros((self.window_trs, y.shape[1]), np.float32)
        rows = ref.tr_start + np.arange(self.window_trs)
        ok = np.array(ref.mask, dtype=bool) & (rows >= 0) & (rows < y.shape[0])
        fmri[ok] = y[rows[ok]]
        return fmri, mask

    def batch(self, items: list[tuple[int, bool]]) -> HostBatch:
        """Stack windows ``[(index, real), ...]`` into a :class:`HostBatch`."""
        parts = [self.load(i, real) for i, real in items]
        return HostBatch(
            features=np.stack([p[0] for p in parts]),  # (B, T, 3, L, D)
            fmri=np.stack([p[1] for p in parts]),  # (B, window_trs, P)
            mask=np.stack([p[2] for p in parts]),  # (B, window_trs)
            subject_id=np.array([p[3] for p in parts], dtype=np.int64),  # (B,)
        )


_LOAD_FRAMES = 64  # frames read at once when a shard is loaded (bounds the temporary copy)


class ResidentShard:
    """A rank's shard of training windows held in memory: per stimulus, the frames its windows cover.

    Loaded once from the store (selected layers only, float16); a window is a slice of it plus zero
    rows past the stimulus edges, bit-identical to the memmap read.

    Args:
        ds: the dataset whose windows ``indices`` (into ``ds.refs``) form the shard.
    """

    def __init__(self, ds: WindowDataset, indices: list[int]):
        self.index = {i: k for k, i in enumerate(indices)}  # dataset index -> position in the shard
        self.refs = [ds.refs[i] for i in indices]
        spans: dict[str, tuple[int, int]] = {}  # stimulus id -> [first, last) frame read
        for ref in self.refs:
            n = ds.store.n_frames(ref.stimulus_id)
            lo, hi = max(ref.frame_start, 0), min(ref.frame_stop, n)
            a, b = spans.get(ref.stimulus_id, (lo, hi))
            spans[ref.stimulus_id] = (min(a, lo), max(b, hi))
        self.frames: dict[str, tuple[int, np.ndarray]] = {}  # stimulus id -> (first frame, (F, 3, L, D) float16)
        for sid, (lo, hi) in spans.items():
            src = ds.store.read(sid)  # (n_frames, 3, L_store, D) memmap
            block = np.empty((max(hi - lo, 0), src.shape[1], len(ds.layers), src.shape[3]), np.float16)
            for a in range(lo, hi, _LOAD_FRAMES):  # contiguous reads of a few frames, then the layer selection
                b = min(a + _LOAD_FRAMES, hi)
                block[a - lo : b - lo] = np.asarray(src[a:b])[:, :, ds.layers]
            self.frames[sid] = (lo, block)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for _, a in self.frames.values())

    def features(self, i: int) -> np.ndarray:
        """Window ``i`` (an index into the dataset's refs, inside this shard): (T, 3, L, D) float16."""
        k = self.index.get(i)
        if k is None:
            raise DataError(f"window {i} is not in this rank's resident shard; expected one of its {len(self.refs)} windows")
        ref = self.refs[k]
        first, block = self.frames[ref.stimulus_id]
        t = ref.frame_stop - ref.frame_start
        lo, hi = max(ref.frame_start, first), min(ref.frame_stop, first + block.shape[0])
        if lo == ref.frame_start and hi == ref.frame_stop:
            return block[lo - first : hi - first].copy()
        feats = np.zeros((t, *block.shape[1:]), np.float16)
        if hi > lo:
            feats[lo - ref.frame_start : hi - ref.frame_start] = block[lo - first : hi - first]
        return feats


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


def rank_slots(global_batch: int, world_size: int) -> list[int]:
    """Windows each rank takes from one global batch, dealt round-robin: ``len(range(r, global_batch, world_size))``."""
    return [len(range(r, global_batch, world_size)) for r in range(world_size)]


def shard_sizes(n: int, global_batch: int, world_size: int) -> list[int]:
    """Windows of each rank's shard: as many as the round-robin deal of :func:`epoch_plan` gives it per epoch.

    So every rank's shard fits its ``steps * slots`` places of an epoch and every window is seen
    once per epoch across ranks (the remaining places repeat windows of the shard, as the wrap
    of :func:`epoch_plan` does).
    """
    if global_batch < world_size:
        raise ConfigError(f"train.batch_size={global_batch} is smaller than the {world_size} workers")
    pos = np.arange(n) % global_batch % world_size  # rank of each place of an unwrapped epoch
    sizes = [int(v) for v in np.bincount(pos, minlength=world_size)]
    if n and min(sizes) == 0:
        raise ConfigError(f"{n} training windows cannot give each of {world_size} ranks a resident shard")
    return sizes


def shard_owner(refs: list[WindowRef], global_batch: int, world_size: int) -> np.ndarray:
    """(n_windows,) the rank whose resident shard holds each window.

    Windows are ordered by stimulus, then start frame, subject and run, and cut into contiguous
    blocks of :func:`shard_sizes`: the windows of one stimulus (all subjects who saw it) stay on
    one rank wherever the sizes allow, so the ranks together hold each stimulus' features about once.
    """
    order = sorted(range(len(refs)), key=lambda i: (refs[i].stimulus_id, refs[i].frame_start, refs[i].subject_index,
                                                      refs[i].fmri_path, refs[i].fmri_key))
    owner = np.empty(len(refs), np.int64)
    owner[order] = np.repeat(np.arange(world_size), shard_sizes(len(refs), global_batch, world_size))
    return owner


def sharded_epoch_plan(
    refs: list[WindowRef], n_parcels: int, global_batch: int, rank: int, owner: np.ndarray, world_size: int, *,
    seed: int, epoch: int,
) -> EpochPlan:
    """Like :func:`epoch_plan` (shuffled), but each rank draws only from its shard (``owner == rank``).

    Each rank takes the epoch's permutation (seeded by (seed, epoch), as :func:`epoch_plan`)
    restricted to its shard, wrapped around to fill its places; the number of steps is that of
    :func:`epoch_plan`. On one rank the plan equals :func:`epoch_plan`'s.
    """
    n, world = len(refs), world_size
    if n == 0:
        return EpochPlan([], [])
    steps = math.ceil(n / global_batch)
    slots = rank_slots(global_batch, world)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    per_rank = []
    for r in range(world):
        own = order[owner[order] == r]
        per_rank.append(np.resize(own, steps * slots[r]).reshape(steps, slots[r]))  # (steps, slots[r])
    n_valid = np.array([ref.n_valid for ref in refs])
    cells = [int(sum(n_valid[p[s]].sum() for p in per_rank)) * n_parcels for s in range(steps)]
    batches = [[(int(i), True) for i in per_rank[rank][s]] for s in range(steps)]
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
