"""Serve throughput and latency against direct in-process Predictor calls on the same inputs.

One run, side by side, for each head of ``--heads`` (``demo``: the demo architecture;
``paper``: the demo architecture at the paper's width, hidden 3072; both 1000 parcels). The
same requests (whole runs of ``--n-trs`` TRs, features posted as ``.npy`` to
``/v1/predict/features``) go

- straight through the in-process ``Predictor``: one run at a time (``predict_run``), and
  ``--clients`` runs per call (``predict_runs``, what batching can reach at best);
- through Ray Serve over HTTP with 1 client and with ``--clients`` client threads, for each
  response form: JSON, ``.npy`` float32 and ``.npy`` float16 (``Accept``).

The 1-client rows interleave request by request with the direct path, so both see the same load.
Each Serve row also splits the time with the replica's ``Server-Timing`` header (body upload,
decode, queue for a batch, forward, encode, the replica's total), the client's decode of the body, and what is
left: HTTP and Ray's proxy. The load average is printed at start and end.

    .venv/bin/python bench/serve.py [--requests 48] [--clients 8] [--n-trs 100] [--heads demo,paper]
        [--features-dtype float32|float16] [--batch 8] [--batch-wait 0.005]
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

FORMATS = {"JSON": None, ".npy f32": "application/x-npy", ".npy f16": "application/x-npy;dtype=float16"}
HEADS = {"demo": [], "paper": ["model.hidden_dim=3072"]}
STAGES = ("body", "decode", "queue", "predict", "encode", "total")


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def server_timing(header: str) -> dict[str, float]:
    out = {}
    for part in header.split(","):
        name, _, rest = part.strip().partition(";")
        out[name] = float(rest.partition("=")[2].strip('"'))
    return out


def row(name: str, samples: list[dict[str, float]], wall: float) -> dict:
    lat = np.array([s["latency"] for s in samples]) * 1000.0
    r = {"name": name, "rps": len(samples) / wall, "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99))}
    if "total" in samples[0]:
        for k in (*STAGES, "batch", "client_decode", "http"):
            r[k] = float(np.mean([s[k] for s in samples]))
        r["batch_max"] = max(s["batch"] for s in samples)
    return r


def bench_head(head: str, args) -> list[dict]:
    import ray
    import requests
    import torch
    from ray import serve

    from mirage.config import MODALITIES, load_config, resolve_paths
    from mirage.distributed.serve import run_server
    from mirage.model import build_model, save_exported
    from mirage.ports import free_port
    from mirage.predictor import Predictor, RunRequest

    work = Path(tempfile.mkdtemp(prefix=f"mirage-bench-serve-{head}-"))
    cfg = resolve_paths(load_config("demo", [
        f"outputs={work}", f"data.n_parcels={args.parcels}", f"serve.port={free_port()}",
        f"serve.max_batch_size={args.batch}", f"serve.batch_wait_timeout_s={args.batch_wait}",
        "serve.max_ongoing_requests=64", *HEADS[head], *args.overrides,
    ]))
    n_layers, dim = cfg.features.tiny.n_layers + 1, cfg.features.tiny.hidden
    torch.manual_seed(0)
    model = build_model(cfg.model, {m: (n_layers, dim) for m in MODALITIES}, args.parcels,
                        len(cfg.data.subjects), cfg.data.window_trs)
    n_params = sum(p.numel() for p in model.parameters())
    model_dir = save_exported(work / "model", model.eval(), cfg, {"feature_key": None})
    del model

    rng = np.random.default_rng(0)
    n_frames = int(round(args.n_trs * cfg.data.tr * cfg.features.rate_hz))
    feats = [rng.standard_normal((n_frames, 3, n_layers, dim)).astype(args.features_dtype) for _ in range(8)]
    reqs = [(feats[i % len(feats)], cfg.data.subjects[i % len(cfg.data.subjects)]) for i in range(args.requests)]
    bodies = []
    for f, _ in reqs:
        buf = io.BytesIO()
        np.save(buf, f, allow_pickle=False)
        bodies.append(buf.getvalue())

    torch.set_num_threads(args.threads)
    direct = Predictor.from_path(model_dir, device="cpu", window_batch=cfg.serve.window_batch)
    direct.predict_run(reqs[0][0], reqs[0][1], args.n_trs)  # warm-up

    def run_direct(i: int) -> dict[str, float]:
        t = time.perf_counter()
        direct.predict_run(reqs[i][0], reqs[i][1], args.n_trs)
        return {"latency": time.perf_counter() - t}

    def run_direct_batched() -> tuple[list[dict[str, float]], float]:
        out, t0 = [], time.perf_counter()
        for s in range(0, len(reqs), args.clients):
            t = time.perf_counter()
            group = range(s, min(s + args.clients, len(reqs)))
            direct.predict_runs([RunRequest(reqs[i][0], reqs[i][1], args.n_trs) for i in group])
            out += [{"latency": time.perf_counter() - t}] * len(group)
        return out, time.perf_counter() - t0

    rows = []
    try:
        url = run_server(cfg, str(model_dir), blocking=False)
        endpoint = f"{url}/v1/predict/features"
        local = threading.local()  # one keep-alive session per client thread
        want = direct.predict_run(reqs[0][0], reqs[0][1], args.n_trs)

        def call(i: int, fmt: str) -> dict[str, float]:
            t = time.perf_counter()
            accept = FORMATS[fmt]
            if not hasattr(local, "session"):
                local.session = requests.Session()
            r = local.session.post(
                endpoint, params={"subject": reqs[i][1], "n_trs": args.n_trs}, data=bodies[i],
                headers={"accept": accept} if accept else {}, timeout=600)
            got_at = time.perf_counter()
            r.raise_for_status()
            got = np.load(io.BytesIO(r.content)) if accept else np.asarray(r.json()["predictions"], np.float32)
            done = time.perf_counter()
            if i == 0:
                tol = 2e-3 if "f16" in fmt else 1e-4
                assert np.allclose(got, want, rtol=tol, atol=tol * 1e-1), f"Serve ({fmt}) disagrees with the predictor"
            s = server_timing(r.headers["server-timing"])
            s.update(latency=done - t, client_decode=done - got_at)
            s["http"] = s["latency"] - s["client_decode"] - s["total"] / 1000.0
            return {k: (v / 1000.0 if k in STAGES else v) for k, v in s.items()}

        for i in range(min(4, len(reqs))):  # warm-up
            for fmt in FORMATS:
                call(i, fmt)
        seq = {name: [] for name in ["direct", *FORMATS]}
        for i in range(len(reqs)):  # 1 client, interleaved with the direct path request by request
            seq["direct"].append(run_direct(i))
            for fmt in FORMATS:
                seq[fmt].append(call(i, fmt))
        rows.append(row("in-process predict_run, sequential", seq["direct"], sum(s["latency"] for s in seq["direct"])))
        lat, wall = run_direct_batched()
        rows.append(row(f"in-process predict_runs, {args.clients} runs per call", lat, wall))
        for fmt in FORMATS:
            rows.append(row(f"Serve, 1 client, {fmt}", seq[fmt], sum(s["latency"] for s in seq[fmt])))
        for fmt in FORMATS:
            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                lat = list(pool.map(lambda i: call(i, fmt), range(len(reqs))))
            rows.append(row(f"Serve, {args.clients} clients, {fmt}", lat, time.perf_counter() - t0))
        lat = [run_direct(i) for i in range(len(reqs))]
        rows.append(row("in-process predict_run again (after Serve)", lat, sum(s["latency"] for s in lat)))
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()

    print(f"\n== head {head}: hidden {cfg.model.hidden_dim}, depth {cfg.model.depth}, {n_params / 1e6:.2f} M params, "
          f"{args.parcels} parcels; {args.requests} runs of {args.n_trs} TRs ({n_frames} frames, "
          f"{len(bodies[0]) / 1e6:.2f} MB {args.features_dtype} .npy each); CPU, direct torch threads {args.threads}, "
          f"Serve 1 replica x {cfg.serve.cpus_per_replica:g} CPU, @serve.batch<={args.batch} "
          f"wait {args.batch_wait * 1000:g} ms")
    print(f"{'path':<42} {'req/s':>7} {'ratio':>6} {'p50 ms':>8} {'p99 ms':>8} | mean ms: "
          f"{'body':>6} {'decode':>6} {'queue':>6} {'fwd':>6} {'encode':>6} {'replica':>7} {'client':>6} {'http':>6} | batch mean/max")
    base = rows[0]["rps"]
    for r in rows:
        line = f"{r['name']:<42} {r['rps']:>7.2f} {r['rps'] / base:>5.2f}x {r['p50']:>8.1f} {r['p99']:>8.1f}"
        if "total" in r:
            line += (f" |          {r['body'] * 1e3:>6.1f} {r['decode'] * 1e3:>6.1f} {r['queue'] * 1e3:>6.1f} {r['predict'] * 1e3:>6.1f} "
                     f"{r['encode'] * 1e3:>6.1f} {r['total'] * 1e3:>7.1f} {r['client_decode'] * 1e3:>6.1f} "
                     f"{r['http'] * 1e3:>6.1f} | {r['batch']:.1f}/{r['batch_max']:g}")
        print(line)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=48, help="requests per measurement")
    ap.add_argument("--clients", type=int, default=8, help="client threads of the concurrent rows")
    ap.add_argument("--n-trs", type=int, default=100, help="TRs per predicted run")
    ap.add_argument("--parcels", type=int, default=1000)
    ap.add_argument("--heads", default="demo,paper", help=f"comma-separated, of {sorted(HEADS)}")
    ap.add_argument("--features-dtype", default="float32", choices=["float32", "float16"],
                    help="dtype of the posted features (the paper's feature store holds float16)")
    ap.add_argument("--batch", type=int, default=8, help="serve.max_batch_size")
    ap.add_argument("--batch-wait", type=float, default=0.005, help="serve.batch_wait_timeout_s")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the direct path (a replica gets 1 CPU)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override on top of the demo preset, for every head")
    args = ap.parse_args()
    heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    unknown = sorted(set(heads) - set(HEADS))
    if unknown:
        ap.error(f"--heads {unknown}: expected some of {sorted(HEADS)}")

    print(f"load average at start (1, 5, 15 min): {load()}; {os.cpu_count()} CPUs", flush=True)
    results = {h: bench_head(h, args) for h in heads}
    print(f"\nload average at end (1, 5, 15 min): {load()}")
    print("ratio = req/s over in-process predict_run, sequential; http = client latency - replica total - client decode")
    for h, rows in results.items():
        base = rows[0]["rps"]
        named = {r["name"]: r["rps"] / base for r in rows}
        print(f"{h}: Serve/in-process " + ", ".join(f"{n.removeprefix('Serve, ')}: {v:.2f}x"
                                                    for n, v in named.items() if n.startswith("Serve")))


if __name__ == "__main__":
    main()
