"""Serve throughput against direct in-process Predictor calls on the same inputs.

One run, side by side: the same exported model (demo architecture, 1000 parcels) and the same
requests (whole runs of ``--n-trs`` TRs, features posted as ``.npz`` to
``/v1/predict/features``, JSON or ``.npy`` responses) go (a) straight through ``Predictor.predict_run`` in this process,
one after another, and (b) through Ray Serve over HTTP, first one at a time (latency) and then
from ``--concurrency`` client threads (throughput, with ``@serve.batch`` grouping requests).

    .venv/bin/python bench/serve.py [--requests 48] [--concurrency 8] [--n-trs 100] [--set model.hidden_dim=768]
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1000.0, q))


def summary(name: str, lat: list[float], wall: float) -> dict[str, float]:
    return {"name": name, "rps": len(lat) / wall, "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "n": len(lat)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=48, help="requests per measurement")
    ap.add_argument("--concurrency", type=int, default=8, help="client threads for the throughput run")
    ap.add_argument("--n-trs", type=int, default=100, help="TRs per predicted run")
    ap.add_argument("--parcels", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=8, help="serve.max_batch_size")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the direct path (a replica gets 1 CPU)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override on top of the demo preset, e.g. --set model.hidden_dim=768")
    args = ap.parse_args()

    import requests
    import torch

    from mirage.config import MODALITIES, load_config, resolve_paths
    from mirage.distributed.serve import run_server
    from mirage.model import build_model, save_exported
    from mirage.predictor import Predictor

    work = Path(tempfile.mkdtemp(prefix="mirage-bench-serve-"))
    cfg = resolve_paths(load_config("demo", [
        f"outputs={work}", f"data.n_parcels={args.parcels}", f"serve.port={free_port()}",
        f"serve.max_batch_size={args.batch}", "serve.batch_wait_timeout_s=0.005", "serve.max_ongoing_requests=64",
        *args.overrides,
    ]))
    n_layers, dim = cfg.features.tiny.n_layers + 1, cfg.features.tiny.hidden
    torch.manual_seed(0)
    model = build_model(cfg.model, {m: (n_layers, dim) for m in MODALITIES}, args.parcels,
                        len(cfg.data.subjects), cfg.data.window_trs)
    model_dir = save_exported(work / "model", model.eval(), cfg, {"feature_key": None})

    rng = np.random.default_rng(0)
    n_frames = int(round(args.n_trs * cfg.data.tr * cfg.features.rate_hz))
    feats = [rng.standard_normal((n_frames, 3, n_layers, dim)).astype(np.float32) for _ in range(8)]
    reqs = [(feats[i % len(feats)], cfg.data.subjects[i % len(cfg.data.subjects)]) for i in range(args.requests)]
    bodies = []
    for f, _ in reqs:
        buf = io.BytesIO()
        np.savez(buf, features=f)
        bodies.append(buf.getvalue())

    torch.set_num_threads(args.threads)
    direct = Predictor.from_path(model_dir, device="cpu", window_batch=cfg.serve.window_batch)
    direct.predict_run(reqs[0][0], reqs[0][1], args.n_trs)  # warm-up

    def run_direct(i: int) -> float:
        t = time.perf_counter()
        direct.predict_run(reqs[i][0], reqs[i][1], args.n_trs)
        return time.perf_counter() - t

    import ray
    from ray import serve

    try:
        url = run_server(cfg, str(model_dir), blocking=False)
        endpoint = f"{url}/v1/predict/features"

        def call(i: int, npy: bool = False) -> float:
            t = time.perf_counter()
            headers = {"accept": "application/x-npy"} if npy else {}
            r = requests.post(endpoint, params={"subject": reqs[i][1], "n_trs": args.n_trs}, data=bodies[i],
                              headers=headers, timeout=300)
            r.raise_for_status()
            got = np.load(io.BytesIO(r.content)) if npy else np.asarray(r.json()["predictions"], np.float32)
            if i == 0:
                want = direct.predict_run(reqs[0][0], reqs[0][1], args.n_trs)
                assert np.allclose(got, want, rtol=1e-4, atol=1e-5), "Serve disagrees with the direct predictor"
            return time.perf_counter() - t

        for i in range(4):  # warm-up
            call(i)
        # sequential, interleaved request by request so that both paths see the same machine load
        lat_d, lat_s, lat_n = [], [], []
        for i in range(len(reqs)):
            lat_d.append(run_direct(i))
            lat_s.append(call(i))
            lat_n.append(call(i, npy=True))
        rows = [summary("direct Predictor.predict_run (in process, sequential)", lat_d, sum(lat_d)),
                summary("Serve HTTP, 1 client, JSON response", lat_s, sum(lat_s)),
                summary("Serve HTTP, 1 client, .npy response", lat_n, sum(lat_n))]
        for npy in (False, True):
            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                lat = list(pool.map(lambda i: call(i, npy), range(len(reqs))))
            rows.append(summary(f"Serve HTTP, {args.concurrency} clients, {'.npy' if npy else 'JSON'} response, "
                                f"@serve.batch<={args.batch}", lat, time.perf_counter() - t0))
        t0 = time.perf_counter()
        lat = [run_direct(i) for i in range(len(reqs))]
        rows.append(summary("direct Predictor.predict_run again (after Serve)", lat, time.perf_counter() - t0))
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()

    print(f"\nrequests: {args.requests} whole runs of {args.n_trs} TRs ({n_frames} feature frames, "
          f"{len(bodies[0]) / 1e6:.2f} MB npz each), {args.parcels} parcels, demo architecture "
          f"(hidden {cfg.model.hidden_dim}, depth {cfg.model.depth}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params), CPU, "
          f"direct torch threads {args.threads}, Serve 1 replica x {cfg.serve.cpus_per_replica:g} CPU")
    print(f"{'path':<70} {'req/s':>8} {'p50 ms':>9} {'p99 ms':>9}")
    for r in rows:
        print(f"{r['name']:<70} {r['rps']:>8.2f} {r['p50_ms']:>9.1f} {r['p99_ms']:>9.1f}")
    base = rows[0]["rps"]
    print("\nthroughput ratio Serve/direct: " + ", ".join(f"{r['name'].split(', ', 1)[1]}: {r['rps'] / base:.2f}x"
                                                        for r in rows[1:5]))
    print(f"direct after Serve ran at {rows[5]['rps'] / base:.2f}x of the first direct measurement")
    print(f"p50 latency added by Serve (1 client): JSON {rows[1]['p50_ms'] - rows[0]['p50_ms']:.1f} ms, "
          f".npy {rows[2]['p50_ms'] - rows[0]['p50_ms']:.1f} ms")


if __name__ == "__main__":
    main()
