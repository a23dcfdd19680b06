"""Batch prediction on Ray Data against the in-process predictor, measured side by side in one run.

The same exported model (demo architecture, seeded, untrained), the same feature store (random
float16 features of the demo store's shape) and the same runs (every validation run of the demo
dataset) are predicted

1. in process: ``Predictor.predict_runs`` on ``stored_runs`` (what ``predict_stored`` does), in groups
   of ``--runs-per-batch`` runs, after the model was loaded once;
2. by ``mirage.distributed.predict.predict_split`` (Ray Data, ``serve.predict_actors`` = 1 actor),
   end to end, with Ray already started;
3. by the same Ray Data pipeline (``PredictActor`` in an actor pool of one) over the runs once and
   over the runs repeated ``--scale`` times: the wall times T(n) = start-up + n / rate give the
   steady rate ((scale - 1) x windows / (T_scale - T_1)) and the fixed start-up (actor start +
   model load + first blocks) apart; the first output row's arrival time is shown too.

Windows are the predictor's windows (``windows_for_prediction``). Ray init, model load and actor
start-up are reported separately; ratios are Ray / in process, with and without start-up. The load
average is printed at start and end.

    .venv/bin/python bench/predict.py [--out DIR] [--repeat 3] [--runs-per-batch 4] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def prepare(out: Path, overrides: list[str]):
    """Demo dataset, a random feature store of the demo shape for its stimuli, and an exported model."""
    import torch

    from mirage.config import MODALITIES, load_config, resolve_paths
    from mirage.data.layout import Release
    from mirage.data.synth import write_synthetic
    from mirage.features.store import StoreWriter, open_store
    from mirage.model import build_model, save_exported

    cfg = resolve_paths(load_config("demo", [f"outputs={out}", "serve.predict_actors=1", *overrides]))
    if not (Path(cfg.data.root) / "_truth" / "truth.json").is_file():
        write_synthetic(cfg.data.root, cfg.data.synth, tr=cfg.data.tr)
    from mirage.data.media import MediaReader

    n_layers, dim = cfg.features.tiny.n_layers + 1, cfg.features.tiny.hidden
    writer = StoreWriter(cfg.features)
    rng = np.random.default_rng(0)
    for sid, stim in sorted(Release(cfg.data.root).stimuli().items()):
        if not writer.has(sid):
            with MediaReader(stim.video) as movie:
                n = int(np.ceil(movie.length_s * cfg.features.rate_hz))
            writer.write(sid, rng.standard_normal((n, 3, n_layers, dim), dtype=np.float32).astype(np.float16))
    store = open_store(cfg.features)
    torch.manual_seed(0)
    model = build_model(cfg.model, {m: (store.n_layers, store.dim) for m in MODALITIES}, cfg.data.n_parcels,
                        len(cfg.data.subjects), cfg.data.window_trs)
    model_dir = out / "model"
    if not model_dir.exists():
        save_exported(model_dir, model.eval(), cfg, {"feature_key": store.key})
    return cfg, model_dir


def in_process(cfg, model_dir: Path, items, runs_per_batch: int) -> dict:
    from mirage.predictor import open_model_store, stored_runs
    from mirage.tracking.models import load_predictor

    t0 = time.perf_counter()
    predictor = load_predictor(str(model_dir), device="cpu", window_batch=cfg.serve.window_batch)
    store = open_model_store(predictor, cfg.features.store)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    preds = {}
    for g in range(0, len(items), runs_per_batch):
        group = {it.key: it.n_trs for it in items[g : g + runs_per_batch]}
        preds.update(zip(group, predictor.predict_runs(stored_runs(store, group))))
    return {"load_s": load_s, "predict_s": time.perf_counter() - t0, "preds": preds}


def ray_end_to_end(cfg, model_dir: Path, split: str, runs_per_batch: int) -> dict:
    from mirage.distributed.predict import predict_split

    t0 = time.perf_counter()
    preds = predict_split(cfg, str(model_dir), split, runs_per_batch=runs_per_batch)
    return {"wall_s": time.perf_counter() - t0, "preds": preds}


def timed_actor():
    """``PredictActor`` that adds each call's duration and end time to its rows."""
    from mirage.distributed.predict import PredictActor

    class TimedPredictActor(PredictActor):
        def __call__(self, batch):
            t0 = time.perf_counter()
            out = super().__call__(batch)
            n = len(out["subject"])
            return {**out, "call_s": [time.perf_counter() - t0] * n, "end_s": [time.time()] * n}

    return TimedPredictActor


def ray_timed(cfg, model_dir: Path, items, runs_per_batch: int, scale: int) -> dict:
    """predict_split's pipeline over ``items`` repeated ``scale`` times: wall time, first-row time, and the
    actor's busy fraction between its first and last call's end (time in ``__call__`` / that span)."""
    import ray

    ds = ray.data.from_items([i.row() for i in items] * scale)
    out = ds.map_batches(
        timed_actor(),
        fn_constructor_kwargs={"model_uri": str(model_dir), "cfg_tree": cfg.to_dict()},
        batch_size=runs_per_batch,
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=cfg.serve.cpus_per_replica,
        num_gpus=cfg.serve.gpus_per_replica,
    )
    t0 = time.perf_counter()
    first, n, calls = None, 0, {}
    for row in out.iter_rows():
        first = time.perf_counter() - t0 if first is None else first
        n += 1
        calls[float(row["end_s"])] = float(row["call_s"])
    assert n == len(items) * scale
    ends = sorted(calls)
    busy = sum(calls[e] for e in ends[1:]) / (ends[-1] - ends[0]) if len(ends) > 1 else float("nan")
    return {"wall_s": time.perf_counter() - t0, "first_s": first, "busy": busy,
            "call_ms": 1000 * float(np.median(list(calls.values())))}


def n_windows(cfg, items, store) -> dict:
    from mirage.data.windows import windows_for_prediction

    return {it.key: len(windows_for_prediction(it.n_trs, cfg.data, store.rate_hz, store.n_frames(it.key.stimulus)))
            for it in items}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: a new temporary folder)")
    ap.add_argument("--split", default="val", help="split to predict (val, friends-s7, ood)")
    ap.add_argument("--repeat", type=int, default=3, help="timed repetitions of each path (best is kept)")
    ap.add_argument("--runs-per-batch", type=int, default=4)
    ap.add_argument("--scale", type=int, default=4, help="repetitions of the runs in the long Ray Data pass")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in process (an actor has 1 CPU)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override on top of the demo preset")
    args = ap.parse_args()
    print(f"load average at start: {os.getloadavg()}")

    import ray
    import torch

    from mirage.distributed.cluster import init_ray
    from mirage.distributed.predict import split_items
    from mirage.features.store import open_store

    torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="mirage-bench-predict-"))
    cfg, model_dir = prepare(out, args.overrides)
    items = split_items(cfg, args.split)
    wins = n_windows(cfg, items, open_store(cfg.features))
    total = sum(wins.values())
    print(f"{len(items)} runs, {total} windows, {cfg.serve.window_batch} windows per forward, "
          f"{args.runs_per_batch} runs per batch, model {cfg.model.hidden_dim} wide")

    local = [in_process(cfg, model_dir, items, args.runs_per_batch) for _ in range(args.repeat)]
    best = min(local, key=lambda r: r["predict_s"])
    t0 = time.perf_counter()
    init_ray(cfg.ray)
    ray_init_s = time.perf_counter() - t0
    try:
        e2e, short, long = [], [], []
        for _ in range(args.repeat):  # interleaved, so that a change of machine load touches every path
            e2e.append(ray_end_to_end(cfg, model_dir, args.split, args.runs_per_batch))
            short.append(ray_timed(cfg, model_dir, items, args.runs_per_batch, 1))
            long.append(ray_timed(cfg, model_dir, items, args.runs_per_batch, args.scale))
    finally:
        ray.shutdown()

    for it in items:  # the Ray path computes what the in-process predictor computes
        got = e2e[0]["preds"][it.key.subject][it.key.name]
        np.testing.assert_allclose(got, best["preds"][it.key], rtol=1e-5, atol=1e-6)

    t_short, t_long = min(r["wall_s"] for r in short), min(r["wall_s"] for r in long)
    steady = (args.scale - 1) * total / max(t_long - t_short, 1e-9)
    startup = t_short - total / steady
    in_rate = total / best["predict_s"]
    in_rate_cold = total / (best["predict_s"] + best["load_s"])
    e2e_best = min(r["wall_s"] for r in e2e)
    ray_rate_e2e = total / e2e_best
    ray_rate_cold = total / (e2e_best + ray_init_s)
    per_batch = best["predict_s"] / -(-len(items) // args.runs_per_batch)

    print("\n                                  windows/s   ratio to in-process")
    print(f"in process (model loaded)          {in_rate:9.1f}   1.00")
    print(f"Ray Data, steady (no start-up)     {steady:9.1f}   {steady / in_rate:.2f}")
    print(f"predict_split, Ray running         {ray_rate_e2e:9.1f}   {ray_rate_e2e / in_rate:.2f}")
    print(f"predict_split + Ray init           {ray_rate_cold:9.1f}   {ray_rate_cold / in_rate_cold:.2f}"
          " (against in process + model load)")
    print("\nfixed start-up (s)")
    print(f"  Ray init                         {ray_init_s:.2f}")
    print(f"  model load + store open (in process) {best['load_s']:.2f}")
    print(f"  Ray Data start-up (actor start + model load + first blocks) {startup:.2f}; first row after "
          f"{min(r['first_s'] for r in short):.2f}; one batch in process {per_batch:.2f}")
    print(f"  Ray Data wall: runs once {t_short:.2f}, {args.scale} times {t_long:.2f} "
          f"(each try: {[round(r['wall_s'], 2) for r in short]}, {[round(r['wall_s'], 2) for r in long]})")
    print(f"\nsteady phase of the long pass: actor busy {max(r['busy'] for r in long):.2f} of the time "
          f"between batches; median call {min(r['call_ms'] for r in long):.1f} ms against {1000 * per_batch:.1f} ms "
          "per batch in process (the rest is Ray Data moving blocks and scheduling)")
    print(f"  predict_split wall {e2e_best:.2f} (each try: {[round(r['wall_s'], 2) for r in e2e]}), "
          f"in-process predict {best['predict_s']:.2f}")
    print(f"\nload average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
