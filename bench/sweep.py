"""Sweep efficiency: the same demo sweep with each trial runner, side by side in one run.

The sweep runs twice, on fresh output folders but the same dataset and feature store, first with
``sweep.trial_runner=trainer`` (a Ray Train ``TorchTrainer`` per trial) then ``direct`` (the
training loop inside the Tune trial process). For each it prints the sweep's wall time, the epochs
trained, the training time (sum of the trials' ``epoch_s``), the trials' wall time (sum of Tune's
``time_total_s`` at each trial's last report) and their ratio, then the direct/trainer ratios.
The machine's load average is printed at the start and the end.

Usage: ``python bench/sweep.py [--out DIR] [--trials N] [--epochs N] [--set key=value ...]``.
Prints a table and ratios; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from mirage.config import load_config, resolve_paths

RUNNERS = ("trainer", "direct")


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} (1, 5, 15 min; {os.cpu_count()} cores)"


def prepare(out: Path, trials: int, epochs: int, sets: list[str]):
    """The demo config on a dataset and feature store under ``out`` (made once)."""
    from demo_inputs import demo_inputs

    return demo_inputs(resolve_paths(load_config("demo", [
        f"outputs={out}", f"train.epochs={epochs}", f"sweep.num_samples={trials}", "train.use_gpu=false", *sets,
    ])))


def trial_rows(exp: Path) -> dict[str, list[dict]]:
    """Trial folder -> the results Tune recorded for it (its ``result.json`` lines)."""
    out = {}
    for d in sorted(p for p in exp.iterdir() if (p / "result.json").is_file()):
        out[d.name] = [json.loads(line) for line in (d / "result.json").read_text().splitlines() if line.strip()]
    return out


def bench_runner(cfg, runner: str, out: Path) -> dict:
    from mirage.distributed.sweep import experiment_path, run_sweep

    folder = out / f"sweep_{runner}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    cfg = cfg.with_overrides({
        "sweep.trial_runner": runner,
        "sweep.name": f"bench-{runner}",
        "train.storage": str(folder / "ray_results"),
        "tracking.uri": f"sqlite:///{folder / 'mlflow.db'}",
    })
    t0 = time.perf_counter()
    res = run_sweep(cfg)
    wall = time.perf_counter() - t0
    rows = trial_rows(experiment_path(cfg))
    train_s = sum(r.get("epoch_s", 0.0) for rs in rows.values() for r in rs)
    trial_s = sum(rs[-1]["time_total_s"] for rs in rows.values() if rs)
    return {
        "runner": runner,
        "wall_s": wall,
        "trials": len(res.trials),
        "epochs": sum(len(rs) for rs in rows.values()),
        "train_s": train_s,
        "trial_s": trial_s,
        "frac": train_s / trial_s if trial_s else float("nan"),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="outputs/bench_sweep", help="working folder (dataset, stores, both sweeps)")
    p.add_argument("--trials", type=int, default=4, help="sweep.num_samples")
    p.add_argument("--epochs", type=int, default=6, help="train.epochs")
    p.add_argument("--set", dest="sets", action="append", default=[], help="config override (key=value), repeatable")
    args = p.parse_args()
    out = Path(args.out).resolve()
    print(f"load average at start: {load()}", flush=True)
    cfg = prepare(out, args.trials, args.epochs, args.sets)

    import ray
    from mirage.distributed.cluster import init_ray

    init_ray(cfg.ray)
    try:
        results = [bench_runner(cfg, r, out) for r in RUNNERS]
    finally:
        ray.shutdown()

    print(f"\nsweep: {args.trials} trials x {args.epochs} epochs, max_concurrent={cfg.sweep.max_concurrent}")
    print(f"{'runner':8} {'sweep wall s':>12} {'trials':>6} {'epochs':>6} {'train s':>9} {'trial s':>9} {'train/trial':>11}")
    for r in results:
        print(f"{r['runner']:8} {r['wall_s']:12.1f} {r['trials']:6d} {r['epochs']:6d} {r['train_s']:9.1f} "
              f"{r['trial_s']:9.1f} {r['frac']:11.3f}")
    by = {r["runner"]: r for r in results}
    t, d = by["trainer"], by["direct"]
    print(f"\ndirect/trainer sweep wall time: {d['wall_s'] / t['wall_s']:.3f}")
    print(f"direct/trainer trial wall time: {d['trial_s'] / t['trial_s']:.3f}" if t["trial_s"] else "")
    print(f"train/trial: trainer {t['frac']:.3f}, direct {d['frac']:.3f}")
    if t["epochs"] != d["epochs"]:
        print(f"note: ASHA stopped trials differently (epochs trained: trainer {t['epochs']}, direct {d['epochs']})")
    print(f"load average at end: {load()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
