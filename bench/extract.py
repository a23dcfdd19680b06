"""Extraction and feature-reader throughput, measured side by side in one run (not a test).

    .venv/bin/python bench/extract.py [--seconds 120] [--out DIR] [--multi-node]

1. Writes a synthetic dataset (the demo layout, ``--seconds`` per run) and plans its work items.
2. Plain loop: one in-process Extractor (tiny backbone) over every work item, arrays assembled in
   memory and saved with ``np.save``: passes (distinct cutoffs: 2 Hz steps and word ends) per second.
3. The Ray Data pipeline (``run_extract``) on the same inputs with 1 and 2 actors, into fresh
   stores: passes per second, ratio to the plain loop, with and without its fixed start-up cost
   (measured separately as the wall time of a one-cutoff job on a started Ray). With each, the
   bytes that crossed into the driver (the pickled metadata rows it iterated: measured), per second
   and per stimulus, next to the feature payload the actors wrote as span files: what the former
   runner, whose actors returned their float32 features as rows, moved through the driver for the
   same work (computed from the span sizes, not measured).
   ``--multi-node`` runs only this step, on a simulated cluster
   (:class:`~mirage.distributed.sim_cluster.SimCluster`: a head offering no CPUs, where the driver
   runs, two GPU-group nodes with two actor slots each and a CPU-group node) with 1, 2 and 4
   actors that request the GPU group's resource: passes per second and driver bytes per second.
4. Feature reader: training windows (``FeatureStore.read_window``) over every stored run, next
   to a raw sequential read of the same files (both from the page cache): GB/s and ratio. Run on
   the tiny store and on a store of paper-sized frames (3 x 49 x 2048 float16, random numbers).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mirage.config import load_config, resolve_paths
from mirage.data.windows import window_frames
from mirage.distributed.cluster import init_ray
from mirage.distributed.extract import run_extract
from mirage.features.extract import Extractor, FeatureArrays, plan_items, stimuli_of
from mirage.features.store import FeatureStore, StoreWriter


def plain_loop(cfg, items, out: Path) -> tuple[float, int]:
    """The plainest way: one extractor in this process, item by item, one np.save per stimulus."""
    t0 = time.perf_counter()
    ex = Extractor(cfg.features)
    sinks: dict[str, FeatureArrays] = {}
    for it in items:
        plan = ex.plan(it.video, it.transcript)
        sink = sinks.setdefault(it.stimulus_id, FeatureArrays(plan.frames, ex.backbone.n_layers, ex.backbone.dim))
        ex.extract_item(it).write(sink)
        if it.stop == it.n_passes:
            np.savez(out / f"{it.stimulus_id}.npz", **sinks.pop(it.stimulus_id).arrays)
    return time.perf_counter() - t0, sum(it.stop - it.start for it in items)


@dataclass
class Traffic:
    """One pipeline run: its time, passes and what crossed into the driver."""

    actors: int
    seconds: float
    passes: int
    stimuli: int
    driver_rows: int
    driver_bytes: int
    span_bytes: int

    def line(self, label: str) -> str:
        s, n = max(self.seconds, 1e-9), max(self.stimuli, 1)
        return (f"{label}: driver {self.driver_bytes / s / 1e3:8.2f} kB/s, {self.driver_bytes / n / 1e3:8.2f} kB per "
                f"stimulus ({self.driver_rows} rows, {self.driver_bytes / max(self.driver_rows, 1):.0f} B each); "
                f"features through the driver before (computed): {self.span_bytes / s / 1e6:8.2f} MB/s, "
                f"{self.span_bytes / n / 1e6:8.2f} MB per stimulus")


def pipeline(cfg, actors: int, store: Path, address: str | None = None,
             resources: dict[str, float] | None = None) -> Traffic:
    """Run ``run_extract`` into a fresh ``store`` with ``actors`` actors.

    ``address``: a running Ray cluster to use (this process connects to it; any other Ray
    connection is closed first); ``resources``: custom Ray resources each actor requests (the worker
    group it must land on).
    """
    overrides = {"features.actors": actors, "features.store": str(store)}
    if resources:
        overrides["features.resources"] = dict(resources)
    if address:
        import ray

        overrides["ray.address"] = address
        if ray.is_initialized():
            ray.shutdown()
    c = cfg.with_overrides(overrides)
    t0 = time.perf_counter()
    result = run_extract(c)
    assert result.ok, result.failed
    return Traffic(actors, time.perf_counter() - t0, result.cutoffs, len(result.written), result.driver_rows,
                   result.driver_bytes, result.span_bytes)


def multi_node(cfg, work: Path, actor_counts=(1, 2, 4)) -> dict[int, Traffic]:
    """``pipeline`` with each of ``actor_counts`` actors on a simulated cluster: a head with no CPUs
    (the driver), two GPU-group nodes of two actor slots and two CPUs each, and one CPU-group node of
    two CPUs (Ray Data's read tasks, the span joins). Every actor requests one GPU-group slot."""
    import ray

    from mirage.distributed.sim_cluster import CPU_GROUP, GPU_GROUP, SimCluster

    if ray.is_initialized():
        ray.shutdown()
    runs: dict[int, Traffic] = {}
    with SimCluster(cfg.ray) as sim:
        for _ in range(2):
            sim.add_node(GPU_GROUP, slots=2, cpus=2)
        sim.add_node(CPU_GROUP, slots=2, cpus=2)
        for n in actor_counts:
            runs[n] = pipeline(cfg, n, work / f"store-multi-{n}", address=sim.address, resources={GPU_GROUP: 1})
    return runs


def startup_cost(cfg, store: Path, plain_rate: float) -> tuple[float, float]:
    """Fixed cost of a pipeline job on a started Ray: time until its first work item comes back
    (actor start, backbone load, planning) minus that item's compute at the plain loop's rate.
    Returns (fixed s, time to first item s)."""
    first = sorted(stimuli_of(cfg))[0]
    result = run_extract(cfg.with_overrides({"features.store": str(store)}), stimuli=[first])
    item = min(cfg.features.cutoffs_per_item, result.cutoffs)
    return max(result.first_result_s - item / plain_rate, 0.0), result.first_result_s


def reader(store: FeatureStore, n_frames_window: int) -> tuple[float, float]:
    """(window GB/s, raw sequential GB/s) over every stimulus of ``store``, page cache warm."""
    files = [store.path(s) for s in store.stimuli()]
    buf = bytearray(max(f.stat().st_size for f in files))
    for f in files:  # warm the page cache
        f.read_bytes()

    def raw_pass() -> int:
        total = 0
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                total += fh.readinto(buf)
        return total

    def window_pass() -> int:
        total = 0
        for s in store.stimuli():
            n = store.n_frames(s)
            for start in range(0, n, n_frames_window):  # stride = window: every frame once
                w = store.read_window(s, start, start + n_frames_window)
                total += (min(start + n_frames_window, n) - start) * w[0].nbytes
        return total

    return _best_rate(window_pass) / 1e9, _best_rate(raw_pass) / 1e9


def _best_rate(fn, repeats: int = 5) -> float:
    """Bytes per second of the fastest of ``repeats`` calls (the machine is shared)."""
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = fn()
        best = max(best, n / (time.perf_counter() - t0))
    return best


def paper_sized_store(cfg, root: Path, n_stimuli=3, n_frames=300) -> FeatureStore:
    c = cfg.with_overrides({"features.store": str(root)})
    w = StoreWriter(c.features)
    rng = np.random.default_rng(0)
    for i in range(n_stimuli):
        w.write(f"paper{i}", rng.standard_normal((n_frames, 3, 49, 2048), dtype=np.float32).astype(np.float16))
    return w.store()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=120.0, help="duration of every synthetic run")
    ap.add_argument("--out", default=None, help="work directory (default: a temp dir, removed after)")
    ap.add_argument("--multi-node", action="store_true",
                    help="only the pipeline, on a simulated multi-node cluster with 1, 2 and 4 actors")
    a = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    work = Path(a.out or tempfile.mkdtemp(prefix="mirage-bench-extract-"))
    cfg = resolve_paths(load_config("demo", [f"outputs={work}", f"data.synth.seconds={a.seconds}",
                                             "data.synth.parcels=8", "data.n_parcels=8"]))
    try:
        from mirage.data.synth import write_synthetic

        if not Path(cfg.data.root).exists():
            write_synthetic(cfg.data.root, cfg.data.synth, tr=cfg.data.tr)
        items = [it for sid, (v, t) in stimuli_of(cfg).items() for it in plan_items(sid, v, t, cfg.features)[1]]
        print(f"workload: {len(stimuli_of(cfg))} stimuli, {len(items)} work items, "
              f"{sum(i.stop - i.start for i in items)} passes; torch threads {cfg.features.torch_threads}")
        if a.multi_node:
            for actors, run in multi_node(cfg, work).items():
                label = f"{actors} actor{'s' if actors > 1 else ' '}"
                print(f"multi-node, {label}: {run.seconds:7.1f} s  {run.passes / run.seconds:6.1f} passes/s")
                print(run.line(f"multi-node, {label}"))
            return

        plain_dir = work / "plain"
        plain_dir.mkdir(exist_ok=True)
        t_plain, n = plain_loop(cfg, items, plain_dir)
        plain_rate = n / t_plain
        print(f"plain loop       : {t_plain:7.1f} s  {plain_rate:6.1f} passes/s  "
              f"({1000 * t_plain / n:.1f} ms per pass, backbone load included)")

        t0 = time.perf_counter()
        init_ray(cfg.ray)
        print(f"ray init         : {time.perf_counter() - t0:7.1f} s (once per process, not counted below)")
        fixed, first = startup_cost(cfg, work / "store-startup", plain_rate)
        print(f"pipeline fixed   : {fixed:7.1f} s  (first work item back after {first:.1f} s)")
        runs: dict[int, Traffic] = {}
        for actors in (1, 2):
            runs[actors] = pipeline(cfg, actors, work / f"store-{actors}")
        t_again, _ = plain_loop(cfg, items, plain_dir)  # again: the machine's load drifts
        print(f"plain loop again : {t_again:7.1f} s  {n / t_again:6.1f} passes/s")
        plain_rate = 2 * n / (t_plain + t_again)
        print(f"plain loop mean  : {plain_rate:6.1f} passes/s ({1000 / plain_rate:.1f} ms per pass)")
        for actors, run in runs.items():
            rate = run.passes / run.seconds
            steady = run.passes / max(run.seconds - fixed, 1e-9)
            print(f"ray data {actors} actor{'s' if actors > 1 else ' '}: {run.seconds:7.1f} s  {rate:6.1f} passes/s  "
                  f"ratio {rate / plain_rate:.2f}  (without fixed cost {steady / plain_rate:.2f})")
        for actors, run in runs.items():
            print(run.line(f"driver, {actors} actor{'s' if actors > 1 else ' '}"))

        store = FeatureStore(next((work / "store-1").iterdir()))
        per_vector = store.n_layers * store.dim * 4  # float32, as the former rows carried them
        vectors = runs[1].span_bytes / per_vector / max(runs[1].stimuli, 1)
        print(f"paper width      : {vectors:.0f} feature vectors per stimulus here x 49 x 2048 x 4 B = "
              f"{vectors * 49 * 2048 * 4 / 1e6:.0f} MB per stimulus through the former driver (computed); "
              f"now {runs[1].driver_bytes / max(runs[1].stimuli, 1) / 1e3:.1f} kB, whatever the width")
        frames = window_frames(cfg.data, cfg.features.rate_hz)
        win, raw = reader(store, frames)
        print(f"reader, tiny     : windows {win:6.2f} GB/s  raw {raw:6.2f} GB/s  ratio {win / raw:.2f}  "
              f"({frames} frames x {store.read(store.stimuli()[0])[0].nbytes} B)")
        big = paper_sized_store(cfg, work / "store-paper")
        paper_frames = window_frames(load_config("paper").data, 2.0)
        win, raw = reader(big, paper_frames)
        print(f"reader, paper    : windows {win:6.2f} GB/s  raw {raw:6.2f} GB/s  ratio {win / raw:.2f}  "
              f"({paper_frames} frames x {big.read('paper0')[0].nbytes} B)")
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        if a.out is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
