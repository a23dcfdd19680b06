"""Training throughput, measured side by side in one run.

1. Windows per second of the same FSDP2 training function, same model and data, launched three ways:
   a plain single-process loop, ``torchrun`` with 2 processes, and Ray Train with 2 CPU workers.
2. The fixed start-up cost of a Ray Train ``fit()`` (call to the first line of the worker loop).
3. The share of step time spent waiting for input (prefetching loader).
4. What the window reader delivers in GB/s at paper width (49 layers x 2048, float16), by loader threads.

Usage: ``python bench/train.py [--out DIR] [--epochs N]``. Prints a table and ratios; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from mirage.config import load_config, resolve_paths

BENCH_OVERRIDES = [
    "data.synth.seasons=[1, 2, 6]",
    "data.synth.episodes=2",
    "data.synth.movies=[life]",
    "data.synth.ood_movies=[chaplin]",
    "data.synth.seconds=60",
    "data.synth.parcels=64",
    "data.n_parcels=64",
    "train.use_gpu=false",
    "train.loader_threads=1",
]


def prepare(out: Path, epochs: int):
    from demo_inputs import demo_inputs

    return demo_inputs(resolve_paths(load_config("demo", BENCH_OVERRIDES + [f"outputs={out}", f"train.epochs={epochs}"])))


def steady(history: list[dict], key: str) -> float:
    """Median over epochs after the first (warm-up)."""
    vals = [h[key] for h in history[1:]] or [h[key] for h in history]
    return float(statistics.median(vals))


def bench_plain(cfg, out: Path) -> dict:
    from mirage.train.loop import LocalSession, fit

    t0 = time.time()
    s = fit(cfg, LocalSession(out / "plain", resume=False))
    return {"history": s["history"], "wall_s": time.time() - t0, "startup_s": s["started_at"] - t0}


def bench_torchrun(cfg, out: Path) -> dict:
    root = out / "torchrun"
    root.mkdir(parents=True, exist_ok=True)
    cfg.dump(root / "config.yaml")
    torchrun = Path(sys.executable).with_name("torchrun")
    t0 = time.time()
    subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "mirage.train.launch",
         "--config", str(root / "config.yaml"), "--root", str(root)],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    s = json.loads((root / "summary.json").read_text())
    return {"history": s["history"], "wall_s": time.time() - t0, "startup_s": s["started_at"] - t0}


def bench_ray(cfg, out: Path) -> dict:
    import ray

    from mirage.distributed.cluster import init_ray
    from mirage.distributed.train import build_trainer

    init_ray(cfg.ray)
    try:
        trainer = build_trainer(cfg.with_overrides({"train.storage": str(out / "ray")}), name=f"bench-{time.time_ns()}")
        t0 = time.time()
        result = trainer.fit()
        wall = time.time() - t0
    finally:
        ray.shutdown()
    s = result.return_value
    return {"history": s["history"], "wall_s": wall, "startup_s": s["started_at"] - t0}


def bench_reader(cfg, out: Path, layers: int, dim: int) -> list[dict]:
    """Window reader throughput from the page cache at paper width, by loader threads."""
    from mirage.data.layout import Release
    from mirage.data.splits import split_runs
    from mirage.features.store import StoreWriter, open_store
    from mirage.train.data import PrefetchLoader, WindowDataset, epoch_plan

    wide = cfg.with_overrides(
        {"features.store": str(out / "wide_store"), "features.revision": f"bench-wide-{layers}x{dim}",
         "model.layers": None}
    )
    writer = StoreWriter(wide.features)
    small = open_store(cfg.features)
    rng = np.random.default_rng(0)
    for sid in sorted({r.stimulus_id for r in split_runs(Release(cfg.data.root), cfg.data, "train")}):
        if not writer.has(sid):
            n = small.n_frames(sid)
            writer.write(sid, rng.standard_normal((n, 3, layers, dim), dtype=np.float32).astype(np.float16))
    store = open_store(wide.features)
    ds = WindowDataset(wide, "train", store)
    plan = epoch_plan(ds.refs, ds.n_parcels, cfg.train.batch_size, 0, 1, shuffle=True, seed=0, epoch=0)
    for hb in PrefetchLoader(ds.batch, plan.batches, 2):  # warm the page cache
        pass
    import torch

    n_windows = len(plan.batches) * cfg.train.batch_size
    rows = []
    for threads in (0, 1, 2, 4):
        loader = PrefetchLoader(ds.batch, plan.batches, threads)
        t0 = time.perf_counter()
        for _ in loader:  # read + layer select + stack only
            pass
        read_s = time.perf_counter() - t0
        loader = PrefetchLoader(ds.batch, plan.batches, threads)
        t0 = time.perf_counter()
        for hb in loader:  # ... and the float16 -> float32 (B, L, T, D) model layout on the CPU
            hb.to(torch.device("cpu"), ("vision", "audio", "text"))
        full_s = time.perf_counter() - t0
        gb = loader.bytes / 1e9
        rows.append({"threads": threads, "gb": gb, "read_gb_per_s": gb / read_s, "full_gb_per_s": gb / full_s,
                     "window_mb": loader.bytes / 1e6 / n_windows})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="outputs/bench_train", help="working folder (dataset, stores, checkpoints)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--reader-layers", type=int, default=49)
    p.add_argument("--reader-dim", type=int, default=2048)
    a = p.parse_args()
    out = Path(a.out).resolve()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cfg = prepare(out, a.epochs)
    print(f"cpu cores: {os.cpu_count()}, epochs: {a.epochs}, batch: {cfg.train.batch_size}, "
          f"window: {cfg.data.window_trs} TRs")

    runs = {
        "plain loop (1 process)": bench_plain(cfg, out),
        "torchrun FSDP2 (2 procs)": bench_torchrun(cfg.with_overrides({"train.num_workers": 2}), out),
        "Ray Train FSDP2 (2 workers)": bench_ray(cfg.with_overrides({"train.num_workers": 2}), out),
    }
    print(f"\n{'path':30s} {'windows/s':>10s} {'epoch s':>8s} {'input wait':>10s} {'start-up s':>10s} {'wall s':>7s}")
    for name, r in runs.items():
        h = r["history"]
        print(f"{name:30s} {steady(h, 'windows_per_s'):10.1f} {steady(h, 'epoch_s'):8.2f} "
              f"{100 * steady(h, 'input_wait_frac'):9.1f}% {r['startup_s']:10.1f} {r['wall_s']:7.1f}")
    w = {k: steady(v["history"], "windows_per_s") for k, v in runs.items()}
    names = list(runs)
    print(f"\nratio Ray/torchrun windows/s: {w[names[2]] / w[names[1]]:.2f}")
    print(f"ratio Ray/plain    windows/s: {w[names[2]] / w[names[0]]:.2f}")
    print(f"ratio torchrun/plain windows/s: {w[names[1]] / w[names[0]]:.2f}")
    print(f"Ray Train fit() fixed start-up (call -> worker loop entry): {runs[names[2]]['startup_s']:.1f} s; "
          f"torchrun: {runs[names[1]]['startup_s']:.1f} s")

    print(f"\nwindow reader at {a.reader_layers} layers x {a.reader_dim} (float16), page cache:")
    for row in bench_reader(cfg, out, a.reader_layers, a.reader_dim):
        print(f"  threads {row['threads']}: read {row['read_gb_per_s']:.2f} GB/s; with CPU float32 cast "
              f"{row['full_gb_per_s']:.2f} GB/s ({row['gb']:.2f} GB, {row['window_mb']:.1f} MB/window)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
