"""The Ray Serve app over real HTTP: offline-equal predictions, 4xx for bad input, concurrency, limits.

One Serve app per module. It serves a copy of the session feature store, so that one test can
break a stored file without touching the other tests' store.
"""

from __future__ import annotations

import io
import json
import shutil
import socket
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pytest
import requests

from mirage.distributed.serve_api import REPRESENTATIONS
from mirage.ports import free_port
from mirage.predictor import Predictor

pytestmark = pytest.mark.slow


TIMEOUT_S = 6.0


@pytest.fixture(scope="module")
def store_copy(feature_store, tmp_path_factory):
    """A copy of the session feature store: (features.store parent, store directory)."""
    parent = tmp_path_factory.mktemp("serve-store")
    shutil.copytree(feature_store.root, parent / feature_store.root.name)
    return parent, parent / feature_store.root.name


@pytest.fixture(scope="module")
def server(serve_cfg, exported_model, store_copy):
    import ray
    from ray import serve

    from mirage.distributed.serve import run_server

    cfg = serve_cfg.with_overrides({
        "serve.port": free_port(), "serve.max_payload_mb": 1.0, "serve.max_uncompressed_mb": 2.0,
        "serve.max_batch_size": 4, "serve.batch_wait_timeout_s": 0.05, "serve.request_timeout_s": TIMEOUT_S,
        "features.store": str(store_copy[0]),
    })
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
        ("post", p, {"json": {"subject": "sub-01"}}, 422, "stimulus: required"),
        ("post", p, {"json": {"subject": 1, "stimulus": sid}}, 422, "subject"),
        ("post", p, {"json": {"subject": "sub-01", "stimulus": sid, "extra": 1}}, 422, "extra: unknown field"),
        ("post", p, {"json": {"subject": "sub-04", "stimulus": sid}}, 422, "unknown subject"),
        ("post", p, {"json": {"subject": "sub-01", "stimulus": "nope"}}, 404, "unknown stimulus"),
        ("post", p, {"json": {"subject": "sub-01", "stimulus": "../../manifest"}}, 404, "unknown stimulus"),
        ("post", p, {"json": {"subject": "sub-01", "stimulus": sid, "n_trs": 0}}, 422, "n_trs"),
        ("post", p, {"json": {"subject": "sub-01", "stimulus": sid, "n_trs": "ten"}}, 422, "n_trs"),
        ("post", p, {"json": {"subject": "sub-01", "stimulus": sid, "n_trs": True}}, 422, "n_trs"),
        ("post", p, {"json": {"subject": "sub-01", "stimulus": sid, "n_trs": 10**9}}, 422, "n_trs"),
        ("get", p, {}, 405, "POST"),
        ("post", f"{server}/v2/nothing", {"json": {}}, 404, "no route"),
        ("post", p, {"data": b"x" * (2 * 1024 * 1024)}, 413, "max_json_kb"),
        ("post", f, {"data": _npz(features=feats)}, 422, "subject: required"),
        ("post", f + "?subject=sub-01", {"data": b"PK\x03\x04garbage"}, 400, "npz"),
        ("post", f + "?subject=sub-01", {"data": b"x" * (2 * 1024 * 1024)}, 413, "max_payload_mb"),
        ("post", f + "?subject=sub-01", {"data": _npz(features=np.array([{"a": 1}], dtype=object))}, 422, "dtype object"),
        ("post", f + "?subject=sub-01", {"data": _npz(x=feats)}, 400, "features"),
        ("post", f + "?subject=sub-01", {"data": _npz(features=feats[:, :2])}, 422, "shape"),
        ("post", f + "?subject=sub-01", {"data": _npz(features=feats[..., :-1])}, 422, "shape"),
        ("post", f + "?subject=sub-01", {"data": _npz(features=feats.astype(np.int32))}, 422, "dtype"),
        ("post", f + "?subject=sub-01", {"data": _npz(features=feats.astype(np.float64))}, 422, "dtype"),
        ("post", f + "?subject=sub-01", {"data": _npz(features=nan)}, 422, "NaN"),
        ("post", f + "?subject=sub-09", {"data": _npz(features=feats)}, 422, "unknown subject"),
        ("post", f + "?subject=sub-01&bogus=1", {"data": _npz(features=feats)}, 422, "bogus: unknown field"),
        ("post", f + "?subject=sub-01&stimulus=%C3%A9%0A", {"data": _npz(features=feats)}, 422, "stimulus"),
    ]
    assert len(cases) >= 15
    for method, url, kw, status, words in cases:
        r = getattr(requests, method)(url, timeout=30, **kw)
        assert r.status_code == status, (url, kw.keys(), r.status_code, r.text[:300])
        assert words.lower() in r.json()["error"].lower(), r.text[:300]
        assert "/tmp" not in r.text, r.text[:300]
        assert requests.get(f"{server}/healthz", timeout=10).status_code == 200
    ok = requests.post(p, json={"subject": "sub-01", "stimulus": sid}, timeout=60)
    assert ok.status_code == 200


def _server_timing(response) -> dict[str, str]:
    """``Server-Timing`` as name -> dur (ms) or desc."""
    out = {}
    for part in response.headers["server-timing"].split(","):
        name, _, rest = part.strip().partition(";")
        out[name] = rest.partition("=")[2].strip('"')
    return out


def test_binary_responses_decode_to_the_json_numbers(server, feature_store):
    sid = sorted(feature_store.stimuli())[2]
    req = {"subject": "sub-03", "stimulus": sid, "n_trs": 12}
    post = lambda accept: requests.post(f"{server}/v1/predict", json=req, headers={"accept": accept}, timeout=60)  # noqa: E731
    plain = requests.post(f"{server}/v1/predict", json=req, timeout=60)
    assert plain.status_code == 200 and plain.headers["content-type"] == "application/json", plain.text[:300]
    want = np.asarray(plain.json()["predictions"], np.float32)
    assert want.shape[0] == 12
    for accept in ("*/*", "text/html, */*;q=0.5", "application/json"):
        r = post(accept)
        assert r.status_code == 200 and r.headers["content-type"] == "application/json", (accept, r.text[:300])
        np.testing.assert_array_equal(np.asarray(r.json()["predictions"], np.float32), want)
    for accept, dtype in [("application/x-npy", "float32"), ("application/x-npy;dtype=float16", "float16")]:
        r = post(accept)
        assert r.status_code == 200 and r.headers["x-mirage-dtype"] == dtype, (accept, r.text[:300])
        arr = np.load(io.BytesIO(r.content), allow_pickle=False)
        assert arr.dtype == dtype and r.headers["x-mirage-shape"] == f"{want.shape[0]},{want.shape[1]}"
        if dtype == "float32":
            np.testing.assert_array_equal(arr, want)
        else:
            np.testing.assert_allclose(arr.astype(np.float32), want, rtol=2.0**-11, atol=2.0**-24)
    r = post("application/vnd.apache.arrow.stream")
    col = pa.ipc.open_stream(r.content).read_all().column("predictions").combine_chunks()
    np.testing.assert_array_equal(col.flatten().to_numpy().reshape(len(col), -1), want)
    timing = _server_timing(r)
    assert {"body", "decode", "queue", "predict", "encode", "total", "batch"} <= set(timing) and int(timing["batch"]) >= 1


def test_an_unsupported_accept_gets_406_naming_the_offers(server, feature_store):
    sid = sorted(feature_store.stimuli())[0]
    r = requests.post(f"{server}/v1/predict", json={"subject": "sub-01", "stimulus": sid},
                      headers={"accept": "text/csv"}, timeout=60)
    assert r.status_code == 406 and r.headers["content-type"] == "application/json", r.text[:300]
    assert "text/csv" in r.json()["error"]
    assert all(rep.describe() in r.json()["error"] for rep in REPRESENTATIONS), r.text[:300]
    feats = np.asarray(feature_store.read(sid)).astype(np.float32)
    r = requests.post(f"{server}/v1/predict/features", params={"subject": "sub-01"}, data=_npz(features=feats),
                      headers={"accept": "application/x-npy;dtype=float64"}, timeout=60)
    assert r.status_code == 406 and "application/x-npy;dtype=float16" in r.json()["error"], r.text[:300]


def test_a_burst_of_concurrent_requests_all_succeed(server, offline, feature_store):
    sids = sorted(feature_store.stimuli())[:4]
    jobs = [(s, sub) for s in sids for sub in ("sub-01", "sub-03", "sub-05")]  # 12 requests

    def call(job):
        s, sub = job
        return requests.post(f"{server}/v1/predict", json={"subject": sub, "stimulus": s, "n_trs": 9}, timeout=120)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(call, jobs))
    assert [r.status_code for r in results] == [200] * len(jobs)
    batches = [int(_server_timing(r)["batch"]) for r in results]
    assert max(batches) > 1, batches  # @serve.batch grouped concurrent requests into shared forward passes
    for (s, sub), r in zip(jobs, results):
        want = offline.predict_run(np.asarray(feature_store.read(s)), sub, 9)
        np.testing.assert_allclose(json.loads(r.content)["predictions"], want, rtol=1e-5, atol=1e-6)


# ---- limits: every attack gets a 4xx (or a bounded answer), and the server stays healthy ----


def _npy_header(shape, descr="<f4") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue()


def _zip_bomb(shape) -> bytes:
    """An npz whose ``features.npy`` honestly inflates to float32 zeros of ``shape`` (written in 1 MiB chunks)."""
    buf = io.BytesIO()
    left, chunk = int(np.prod(shape)) * 4, bytes(1 << 20)
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z, z.open("features.npy", "w", force_zip64=True) as f:
        f.write(_npy_header(shape))
        while left:
            f.write(chunk[: min(left, len(chunk))])
            left -= min(left, len(chunk))
    return buf.getvalue()


def _healthy(server) -> bool:
    return requests.get(f"{server}/healthz", timeout=10).status_code == 200


def test_a_zip_bomb_or_a_huge_declared_array_gets_413_before_inflating(server, feature_store):
    _, _, n_layers, dim = feature_store.read(sorted(feature_store.stimuli())[0]).shape
    f = f"{server}/v1/predict/features?subject=sub-01&n_trs=5"
    frame = 3 * n_layers * dim * 4
    bomb = _zip_bomb(((64 << 20) // frame, 3, n_layers, dim))  # 64 MiB of zeros, under the 1 MiB body limit
    assert len(bomb) < (1 << 20)
    stored = io.BytesIO()
    with zipfile.ZipFile(stored, "w") as z:
        z.writestr("features.npy", _npy_header((10**9, 3, n_layers, dim)) + bytes(64))
    for body in (bomb, stored.getvalue(), _npy_header((10**9, 3, n_layers, dim)) + bytes(64)):
        t = time.perf_counter()
        r = requests.post(f, data=body, timeout=60)
        assert r.status_code == 413, r.text[:300]
        assert "uncompressed" in r.json()["error"] and "max_uncompressed" not in r.text
        assert time.perf_counter() - t < 5
    assert _healthy(server)


def test_a_raw_npy_body_predicts_like_the_npz(server, feature_store):
    feats = np.asarray(feature_store.read(sorted(feature_store.stimuli())[0])).astype(np.float32)
    q = {"subject": "sub-03", "n_trs": 7}
    buf = io.BytesIO()
    np.save(buf, feats, allow_pickle=False)
    a = requests.post(f"{server}/v1/predict/features", params=q, data=buf.getvalue(), timeout=60)
    b = requests.post(f"{server}/v1/predict/features", params=q, data=_npz(features=feats), timeout=60)
    assert a.status_code == b.status_code == 200, a.text[:300]
    assert a.json()["shape"] == [7, b.json()["shape"][1]]
    np.testing.assert_array_equal(a.json()["predictions"], b.json()["predictions"])


def test_n_trs_is_bounded_by_the_frames_of_the_input(server, offline, feature_store, serve_cfg):
    sid = sorted(feature_store.stimuli())[0]
    feats = np.asarray(feature_store.read(sid)).astype(np.float32)
    extra = serve_cfg.serve.extra_trs
    most = offline.default_n_trs(len(feats)) + extra
    f, p = f"{server}/v1/predict/features", f"{server}/v1/predict"
    r = requests.post(f, params={"subject": "sub-01", "n_trs": 100_000}, data=_npz(features=feats[:1]), timeout=60)
    assert r.status_code == 422 and "1 feature frames span 1 TRs" in r.json()["error"], r.text[:300]
    r = requests.post(p, json={"subject": "sub-01", "stimulus": sid, "n_trs": most + 1}, timeout=60)
    assert r.status_code == 422 and f"expected at most {most}" in r.json()["error"], r.text[:300]
    r = requests.post(p, json={"subject": "sub-01", "stimulus": sid, "n_trs": most}, timeout=60)
    assert r.status_code == 200 and r.json()["shape"][0] == most


def test_huge_integers_deep_json_and_non_ascii_digits_get_4xx(server, feature_store):
    sid = sorted(feature_store.stimuli())[0]
    p, f = f"{server}/v1/predict", f"{server}/v1/predict/features"
    npz = _npz(features=np.asarray(feature_store.read(sid)).astype(np.float32))
    cases = [
        (p, {"data": ('{"subject": "sub-01", "stimulus": "%s", "n_trs": %s}' % (sid, "1" * 5000)).encode()}, 400, "5000 digits"),
        (p, {"data": ('{"subject": "sub-01", "stimulus": "%s", "n_trs": %s}' % (sid, "9" * 19)).encode()}, 400, "19 digits"),
        (p, {"data": b"[" * 100_000 + b"]" * 100_000}, 413, "max_json_kb"),
        (p, {"data": b"[" * 30_000 + b"]" * 30_000}, 400, "nested too deeply"),
        (p, {"data": b'{"a":' * 10_000 + b"1" + b"}" * 10_000}, 400, "nested too deeply"),
        (p, {"data": ('{"subject": "sub-01", "stimulus": "%s", "n_trs": NaN}' % sid).encode()}, 400, "NaN"),
        (p, {"json": {"subject": "sub-01", "stimulus": sid, "n_trs": "\u0663"}}, 422, "n_trs"),
        (p, {"json": {"subject": "sub-01", "stimulus": sid, "n_trs": 3.0}}, 422, "n_trs"),
        (f + "?subject=sub-01&n_trs=\u00b2", {"data": npz}, 422, "ASCII digits"),
        (f + "?subject=sub-01&n_trs=\u0663", {"data": npz}, 422, "ASCII digits"),
        (f + "?subject=sub-01&n_trs=%2B5", {"data": npz}, 422, "ASCII digits"),
        (f + "?subject=sub-01&n_trs=1_0", {"data": npz}, 422, "ASCII digits"),
        (f + "?subject=sub-01&n_trs=" + "1" * 5000, {"data": npz}, 422, "ASCII digits"),
    ]
    for url, kw, status, words in cases:
        r = requests.post(url, timeout=30, **kw)
        assert r.status_code == status, (url[:80], r.status_code, r.text[:300])
        assert words in r.json()["error"], r.text[:300]
    assert _healthy(server)


def _stalled_upload(url: str, extra_headers: str = "") -> tuple[bytes, float]:
    """POST a JSON body that stops half way; returns what the server answered and after how long."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.settimeout(4 * TIMEOUT_S)
        head = f"POST /v1/predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n"
        t = time.perf_counter()
        s.sendall((head + extra_headers + "\r\n").encode() + b'{"subject": ')
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                length = [int(v) for k, v in (h.split(b":", 1) for h in head.split(b"\r\n")[1:]) if k.lower() == b"content-length"]
                if length and len(body) >= length[0]:
                    break
        except TimeoutError:
            pass
        return data, time.perf_counter() - t


def test_a_stalled_upload_gets_408_after_the_request_timeout(server):
    # the second one asks Ray's proxy to lift its timeout; the replica's own timeout still holds
    with ThreadPoolExecutor(max_workers=2) as pool:
        answers = list(pool.map(lambda h: _stalled_upload(server, h), ["", "x-request-timeout-seconds: 0\r\n"]))
    for data, elapsed in answers:
        assert data.startswith(b"HTTP/1.1 408"), (data[:300], elapsed)
        assert b"serve.request_timeout_s" in data and TIMEOUT_S - 0.5 < elapsed < 2 * TIMEOUT_S, (data[:300], elapsed)
    assert _healthy(server)


def test_error_messages_name_no_server_path(server, store_copy, feature_store, exported_model):
    parent, store_dir = store_copy
    sid = sorted(feature_store.stimuli())[-1]  # read by no other test of this module
    (store_dir / f"{sid}.npy").write_bytes(b"not an npy file")
    r = requests.post(f"{server}/v1/predict", json={"subject": "sub-01", "stimulus": sid}, timeout=30)
    assert r.status_code == 500 and f"stimulus {sid!r}" in r.json()["error"], r.text[:300]
    h = requests.get(f"{server}/healthz", timeout=10)
    assert h.status_code == 200 and h.json()["model"] == exported_model.name
    for text in (r.text, h.text):
        assert str(parent) not in text and str(exported_model) not in text and "/tmp" not in text, text[:300]


def test_openapi_lists_the_routes_and_docs_serve_the_ui(server):
    spec = requests.get(f"{server}/openapi.json", timeout=10)
    assert spec.status_code == 200
    paths = spec.json()["paths"]
    assert {"/healthz", "/v1/predict", "/v1/predict/features"} <= set(paths)
    body = paths["/v1/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(body["properties"]) == {"subject", "stimulus", "n_trs"}
    assert {q["name"] for q in paths["/v1/predict/features"]["post"]["parameters"]} == {"subject", "n_trs", "stimulus"}
    for route in ("/v1/predict", "/v1/predict/features"):
        answers = paths[route]["post"]["responses"]
        assert {"application/json", "application/x-npy", "application/vnd.apache.arrow.stream"} <= set(answers["200"]["content"])
        assert "406" in answers and "float16" in answers["200"]["description"]
    docs = requests.get(f"{server}/docs", timeout=10)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
