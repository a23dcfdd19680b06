"""Training input at paper width, measured side by side in one run.

A synthetic release (Friends season 1 only, ``--seconds`` per stimulus) gets a random feature store
at paper width (``--layers`` x ``--dim``, float16; paper: 49 x 2048, so a window of 100 TRs is
298 x 3 x 49 x 2048 x 2 B = 180 MB), and training windows of ``data.window_trs`` = 100 TRs. A
consumer emulates a GPU step of ``--step-ms`` (sleep; with ``--device cuda`` the batch is also
copied to the GPU from pinned memory first) for every batch of ``--batch`` windows, and each
reader is measured over the same epoch plan:

- memmap with 1, 2 and 4 loader threads (``train.input: memmap``, page cache warm);
- resident (``train.input: resident``; the shard is loaded once, timed separately), 1 and 2 threads;
- a raw in-memory copy of one batch per step (the limit of any reader that assembles batches).

Reported: windows/s, GB/s delivered, and the fraction of wall time the step waited for input.
The store size is ``stimuli x frames x 3 x layers x dim x 2 B``; keep it within the machine's
free memory (the default, 6 stimuli of 300 s, is 2.2 GB). The load average is printed at start and end.

    .venv/bin/python bench/input.py [--out DIR] [--seconds 300] [--episodes 3] [--epochs 3] [--step-ms 50] [--batch 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def prepare(out: Path, args):
    from mirage.config import load_config, resolve_paths
    from mirage.data.layout import Release
    from mirage.data.media import MediaReader
    from mirage.data.synth import write_synthetic
    from mirage.features.store import StoreWriter, open_store

    cfg = resolve_paths(load_config("demo", [
        f"outputs={out}", "data.synth.seasons=[1]", f"data.synth.episodes={args.episodes}", "data.synth.movies=[]",
        "data.synth.ood_movies=[]", f"data.synth.seconds={args.seconds}", "data.synth.parcels=64", "data.n_parcels=64",
        'data.train=["friends:s1"]', 'data.val=["friends:s1"]', "data.window_trs=100", "data.stride_trs=100",
        f"features.revision=bench-input-{args.layers}x{args.dim}", "model.layers=null",
        f"train.batch_size={args.batch}",
    ]))
    if not (Path(cfg.data.root) / "_truth" / "truth.json").is_file():
        write_synthetic(cfg.data.root, cfg.data.synth, tr=cfg.data.tr)
    writer = StoreWriter(cfg.features)
    rng = np.random.default_rng(0)
    chunk = rng.standard_normal((16, 3, args.layers, args.dim), dtype=np.float32).astype(np.float16)
    for sid, stim in sorted(Release(cfg.data.root).stimuli().items()):
        if writer.has(sid):
            continue
        with MediaReader(stim.video) as movie:
            n = int(np.ceil(movie.length_s * cfg.features.rate_hz))
        part = writer.begin(sid, (n, 3, args.layers, args.dim))
        for start in range(0, n, len(chunk)):
            block = chunk[: min(len(chunk), n - start)] + np.float16(start % 7)  # rows differ between chunks
            part.put(start, block)
        part.commit()
    return cfg, open_store(cfg.features)


def consume(loader, step_s: float, device, modalities) -> dict:
    """Run the emulated step over ``loader``; windows/s, GB/s and the input-wait fraction."""
    import torch

    t0 = time.perf_counter()
    n = 0
    for hb in loader:
        if device is not None:
            hb.to(device, modalities, pin=True)
            torch.cuda.synchronize(device)
        time.sleep(step_s)
        n += hb.features.shape[0]
    wall = time.perf_counter() - t0
    return {"windows_per_s": n / wall, "gb_per_s": loader.bytes / 1e9 / wall, "wait_frac": loader.wait_s / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: a new temporary folder)")
    ap.add_argument("--seconds", type=float, default=300.0, help="seconds per synthetic stimulus")
    ap.add_argument("--episodes", type=int, default=3, help="Friends S1 episodes (2 stimuli each)")
    ap.add_argument("--layers", type=int, default=49)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=2, help="windows per step (one rank's share of a global batch)")
    ap.add_argument("--step-ms", type=float, default=50.0, help="emulated GPU step")
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs per reader")
    ap.add_argument("--device", default=None, help="copy each batch to this device (e.g. cuda) before the step")
    args = ap.parse_args()
    print(f"load average at start: {os.getloadavg()}")

    import torch

    from mirage.train.data import PrefetchLoader, WindowDataset

    out = args.out or Path(tempfile.mkdtemp(prefix="mirage-bench-input-"))
    cfg, store = prepare(out, args)
    device = torch.device(args.device) if args.device else None
    step_s = args.step_ms / 1000.0
    modalities = cfg.model.modalities
    store_gb = sum(store.read(s).nbytes for s in store.stimuli()) / 1e9
    memmap = WindowDataset(cfg, "train", store)
    plans = [memmap.plan(args.batch, shuffle=True, seed=0, epoch=e) for e in range(args.epochs)]
    items = [b for p in plans for b in p.batches]
    window_mb = memmap.load(0)[0].nbytes / 1e6
    print(f"store {store_gb:.3f} GB ({len(store.stimuli())} stimuli), {len(memmap)} windows of {window_mb:.0f} MB, "
          f"{len(items)} steps of {args.batch} windows, step {args.step_ms:.0f} ms")

    for _ in PrefetchLoader(memmap.batch, plans[0].batches, 2):  # warm the page cache
        pass
    rows = []
    for threads in (1, 2, 4):
        rows.append((f"memmap, {threads} threads", consume(PrefetchLoader(memmap.batch, items, threads), step_s,
                                                          device, modalities)))
    t0 = time.perf_counter()
    resident = WindowDataset(cfg.with_overrides({"train.input": "resident"}), "train", store)
    load_s = time.perf_counter() - t0
    for threads in (1, 2):
        rows.append((f"resident, {threads} threads", consume(PrefetchLoader(resident.batch, items, threads), step_s,
                                                            device, modalities)))
    fixed = memmap.batch(items[0])

    def raw(_item):
        return type(fixed)(fixed.features.copy(), fixed.subject_id.copy(), fixed.fmri.copy(), fixed.mask.copy())

    rows.append(("raw in-memory copy, 1 thread", consume(PrefetchLoader(raw, items, 1), step_s, device, modalities)))

    ideal = args.batch / step_s
    print(f"\nstep-bound limit: {ideal:.1f} windows/s")
    print(f"{'reader':32s} {'windows/s':>10s} {'GB/s':>7s} {'wait frac':>10s} {'vs raw':>7s}")
    raw_rate = rows[-1][1]["windows_per_s"]
    for name, r in rows:
        print(f"{name:32s} {r['windows_per_s']:10.2f} {r['gb_per_s']:7.2f} {r['wait_frac']:10.3f} "
              f"{r['windows_per_s'] / raw_rate:7.2f}")
    print(f"\nresident shard: {resident.resident.nbytes / 1e9:.3f} GB loaded in {load_s:.2f} s "
          f"({resident.resident.nbytes / 1e9 / max(load_s, 1e-9):.2f} GB/s)")
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
