"""The Ray Serve app over real HTTP: offline-equal predictions, 4xx for bad input, concurrency."""

from __future__ import annotations

import io
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from mirage.predictor import Predictor

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(serve_cfg, exported_model, feature_store):
    import ray
    from ray import serve

    from mirage.distributed.serve import run_server

    cfg = serve_cfg.with_overrides(
        {"serve.port": free_port(), "serve.max_payload_mb": 1.0, "serve.max_batch_size": 4, "serve.batch_wait_timeout_s": 0.05}
    )
    try:
        url = run_server(cfg, str(exported_model), blocking=False)
        deadline = time.time() + 120
        while True:
            try:
                if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.time() > deadline:
                raise TimeoutError(f"Serve did not come up at {url}")
            time.sleep(0.5)
        yield url
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()


@pytest.fixture(scope="module")
def offline(exported_model):
    return Predictor.from_path(exported_model, device="cpu")


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_health_reports_the_model(server, feature_store):
    r = requests.get(f"{server}/healthz", timeout=10)
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["subjects"] == ["sub-01", "sub-02", "sub-03", "sub-05"]
    assert body["feature_key"] == feature_store.key


def test_round_trip_equals_offline_predictor(server, offline, feature_store):
    sid = sorted(feature_store.stimuli())[1]
    feats = np.asarray(feature_store.read(sid))
    r = requests.post(f"{server}/v1/predict", json={"subject": "sub-02", "stimulus": sid}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["subject"] == "sub-02" and body["stimulus"] == sid
    got = np.asarray(body["predictions"], dtype=np.float32)
    assert list(got.shape) == body["shape"] and got.shape[1] == offline.n_parcels
    np.testing.assert_allclose(got, offline.predict_run(feats, "sub-02", got.shape[0]), rtol=1e-5, atol=1e-6)

    r2 = requests.post(f"{server}/v1/predict", json={"subject": "sub-05", "stimulus": sid, "n_trs": 11}, timeout=60)
    np.testing.assert_allclose(r2.json()["predictions"], offline.predict_run(feats, "sub-05", 11), rtol=1e-5, atol=1e-6)

    # the same features posted as an npz (a stimulus outside the store)
    r3 = requests.post(
        f"{server}/v1/predict/features",
        params={"subject": "sub-02", "n_trs": got.shape[0], "stimulus": "my-clip"},
        data=_npz(features=feats.astype(np.float32)),
        timeout=60,
    )
    assert r3.status_code == 200, r3.text
    assert r3.json()["stimulus"] == "my-clip"
    np.testing.assert_allclose(r3.json()["predictions"], got, rtol=1e-5, atol=1e-6)

    # binary response: float32 .npy body, fields in headers
    r4 = requests.post(f"{server}/v1/predict", json={"subject": "sub-02", "stimulus": sid},
                       headers={"accept": "application/x-npy"}, timeout=60)
    assert r4.status_code == 200 and r4.headers["content-type"] == "application/x-npy"
    arr = np.load(io.BytesIO(r4.content), allow_pickle=False)
    assert arr.dtype == np.float32 and r4.headers["x-mirage-shape"] == f"{got.shape[0]},{got.shape[1]}"
    assert r4.headers["x-mirage-stimulus"] == sid and r4.headers["x-mirage-subject"] == "sub-02"
    np.testing.assert_array_equal(arr, got)


def test_malformed_requests_get_4xx_and_the_server_stays_healthy(server, feature_store):
    sid = sorted(feature_store.stimuli())[0]
    feats = np.asarray(feature_store.read(sid)).astype(np.float32)
    p, f = f"{server}/v1/predict", f"{server}/v1/predict/features"
    nan = feats.copy()
    nan[2, 0, 0, 0] = np.nan
    cases = [
        ("post", p, {"data": b"not json"}, 400, "JSON"),
        ("post", p, {"data": b"\xff\xfe\x00"}, 400, "JSON"),
        ("post", p, {"json": [1, 2]}, 400, "object"),
        ("post", p, {"json": {"subject": "sub-01"}}, 400, "stimulus"),
        ("post", p, {"json": {"subject": 1, "stimulus": sid}}, 400, "subject"),
        ("post", p, {"json": {"subject": "sub-01", "stimulus": sid, "extra": 1}}, 400, "unknown fields"),
        ("post", p, {"json": {"subject": "sub-04", "stimulus": sid}}, 422, "unknown subject"),
        ("post", p, {"json": {"subject": "sub-01", "stimulus": "nope"}}, 404, "unknown stimulus"),
        ("post", p, {"json": {"subject": "sub-01", "stimulus": "../../manifest"}}, 404, "unknown stimulus"),
        ("post", p, {"json": {"subject": "sub-01", "stimulus": sid, "n_trs": 0}}, 422, "n_trs"),
        ("post", p, {"json": {"subject": "sub-01", "stimulus": sid, "n_trs": "ten"}}, 422, "n_trs"),
        ("post", p, {"json": {"subject": "sub-01", "stimulus": sid, "n_trs": 10**9}}, 422, "n_trs"),
        ("get", p, {}, 405, "POST"),
        ("post", f"{server}/v2/nothing", {"json": {}}, 404, "no route"),
        ("post", p, {"data": b"x" * (2 * 1024 * 1024)}, 413, "max_payload_mb"),
        ("post", f, {"data": _npz(features=feats)}, 400, "subject"),
        ("post", f + "?subject=sub-01", {"data": b"PK\x03\x04garbage"}, 400, "npz"),
        ("post", f + "?subject=sub-01", {"data": _npz(features=np.array([{"a": 1}], dtype=object))}, 400, "object"),
        ("post", f + "?subject=sub-01", {"data": _npz(x=feats)}, 400, "features"),
        ("post", f + "?subject=sub-01", {"data": _npz(features=feats[:, :2])}, 422, "shape"),
        ("post", f + "?subject=sub-01", {"data": _npz(features=feats[..., :-1])}, 422, "shape"),
        ("post", f + "?subject=sub-01", {"data": _npz(features=feats.astype(np.int32))}, 422, "dtype"),
        ("post", f + "?subject=sub-01", {"data": _npz(features=feats.astype(np.float64))}, 422, "dtype"),
        ("post", f + "?subject=sub-01", {"data": _npz(features=nan)}, 422, "NaN"),
        ("post", f + "?subject=sub-09", {"data": _npz(features=feats)}, 422, "unknown subject"),
        ("post", f + "?subject=sub-01&bogus=1", {"data": _npz(features=feats)}, 400, "unknown query"),
        ("post", f + "?subject=sub-01&stimulus=%C3%A9%0A", {"data": _npz(features=feats)}, 400, "label"),
    ]
    assert len(cases) >= 15
    for method, url, kw, status, words in cases:
        r = getattr(requests, method)(url, timeout=30, **kw)
        assert r.status_code == status, (url, kw.keys(), r.status_code, r.text[:300])
        assert words.lower() in r.json()["error"].lower(), r.text[:300]
        assert requests.get(f"{server}/healthz", timeout=10).status_code == 200
    ok = requests.post(p, json={"subject": "sub-01", "stimulus": sid}, timeout=60)
    assert ok.status_code == 200


def test_a_burst_of_concurrent_requests_all_succeed(server, offline, feature_store):
    sids = sorted(feature_store.stimuli())[:4]
    jobs = [(s, sub) for s in sids for sub in ("sub-01", "sub-03", "sub-05")]  # 12 requests

    def call(job):
        s, sub = job
        return requests.post(f"{server}/v1/predict", json={"subject": sub, "stimulus": s, "n_trs": 9}, timeout=120)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(call, jobs))
    assert [r.status_code for r in results] == [200] * len(jobs)
    for (s, sub), r in zip(jobs, results):
        want = offline.predict_run(np.asarray(feature_store.read(s)), sub, 9)
        np.testing.assert_allclose(json.loads(r.content)["predictions"], want, rtol=1e-5, atol=1e-6)
