"""Ray Serve app: whole-run predictions over HTTP with the same Predictor as batch prediction.

Routes (JSON responses; every client error is a 4xx with ``{"error": message}``):

- ``GET /healthz`` -> model source, subjects, parcels, feature store key.
- ``POST /v1/predict`` with ``{"subject": "sub-01", "stimulus": "s07e01a", "n_trs": 460}``
  (``n_trs`` optional: the TRs the stimulus' features span) -> ``{"subject", "stimulus",
  "shape", "predictions"}`` from the feature store.
- ``POST /v1/predict/features?subject=sub-01[&n_trs=...][&stimulus=label]`` with an ``.npz``
  body holding ``features`` (n_frames, 3, n_layers, dim) float16/float32, for stimuli outside
  the store; read with ``allow_pickle=False``.

With ``Accept: application/x-npy`` the predictions come back as a float32 ``.npy`` body
(subject, stimulus and shape in ``x-mirage-*`` headers) instead of JSON lists.

Requests are validated one by one, then grouped with ``@serve.batch`` so that the windows of
several runs share forward passes. Replicas, autoscaling, batch size and the payload limit
come from ``cfg.serve``; the HTTP proxy binds ``cfg.serve.host`` (127.0.0.1 by default).
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import time
import zipfile
from typing import Any

import numpy as np
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mirage.config import Config, load_config, resolve_paths
from mirage.errors import DataError, FeatureStoreError, MirageError
from mirage.predictor import Predictor, RunRequest

JSON_FIELDS = {"subject", "stimulus", "n_trs"}
NPY_MEDIA_TYPE = "application/x-npy"


class HTTPError(Exception):
    """A client error: status code and message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def open_model_store(predictor: Predictor, store_root: str):
    """The feature store the model was trained on, under ``store_root`` (None when absent)."""
    from mirage.features.store import open_store

    features = predictor.cfg.with_overrides({"features.store": store_root}).features
    store = open_store(features, must_exist=False)
    if store is not None and predictor.feature_key and store.key != predictor.feature_key:
        raise FeatureStoreError(
            f"feature store {store_root}: key {store.key} differs from the model's training features {predictor.feature_key}"
        )
    return store


class MirageService:
    """One Serve replica: a Predictor, the feature store and request validation."""

    def __init__(self, model_uri: str, cfg_tree: dict[str, Any]):
        cfg = Config.model_validate(cfg_tree)
        self.cfg = cfg
        self.max_bytes = int(cfg.serve.max_payload_mb * 1024 * 1024)
        device = "cuda" if cfg.serve.gpus_per_replica > 0 else "cpu"
        self.predictor = Predictor.from_uri(
            model_uri, tracking_uri=cfg.tracking.uri, device=device, window_batch=cfg.serve.window_batch
        )
        self.store = open_model_store(self.predictor, cfg.features.store)
        self.predict_batch.set_max_batch_size(cfg.serve.max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(cfg.serve.batch_wait_timeout_s)

    # -------------------------------------------------------------- routing

    async def __call__(self, request: Request) -> JSONResponse:
        try:
            path, method = request.url.path.rstrip("/") or "/", request.method
            routes = {"/healthz": ("GET", self.health), "/v1/predict": ("POST", self.predict_json),
                      "/v1/predict/features": ("POST", self.predict_npz)}
            if path not in routes:
                raise HTTPError(404, f"no route {path}; expected one of {sorted(routes)}")
            want, handler = routes[path]
            if method != want:
                raise HTTPError(405, f"{path} accepts {want}, got {method}")
            result = await handler(request)
            if "predictions" in result and NPY_MEDIA_TYPE in request.headers.get("accept", ""):
                return _npy_response(result)
            if "predictions" in result:
                result["predictions"] = result["predictions"].tolist()
            return JSONResponse(result)
        except HTTPError as e:
            return JSONResponse({"error": e.message}, status_code=e.status)
        except MirageError as e:
            return JSONResponse({"error": str(e)}, status_code=422)

    async def health(self, request: Request) -> dict[str, Any]:
        return {
            "status": "ok",
            "model": self.predictor.source,
            "subjects": self.predictor.subjects,
            "n_parcels": self.predictor.n_parcels,
            "feature_key": self.store.key if self.store is not None else None,
        }

    async def _body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            raise HTTPError(413, f"payload of {declared} bytes exceeds serve.max_payload_mb={self.cfg.serve.max_payload_mb}")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_bytes:
                raise HTTPError(413, f"payload exceeds serve.max_payload_mb={self.cfg.serve.max_payload_mb}")
        return body

    # ---------------------------------------------------------------- routes

    async def predict_json(self, request: Request) -> dict[str, Any]:
        body = await self._body(request)
        try:
            req = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HTTPError(400, f"body is not valid JSON ({e}); expected {{\"subject\": ..., \"stimulus\": ...}}") from None
        if not isinstance(req, dict):
            raise HTTPError(400, f"expected a JSON object with {sorted(JSON_FIELDS)}, got {type(req).__name__}")
        unknown = sorted(set(req) - JSON_FIELDS)
        if unknown:
            raise HTTPError(400, f"unknown fields {unknown}; expected {sorted(JSON_FIELDS)}")
        for field in ("subject", "stimulus"):
            if not isinstance(req.get(field), str):
                raise HTTPError(400, f"field {field!r} must be a string, got {req.get(field)!r}")
        subject, stimulus = req["subject"], req["stimulus"]
        self._check_subject(subject)
        if self.store is None:
            raise HTTPError(404, f"no feature store of this model under {self.cfg.features.store}; post features instead")
        if not self.store.has(stimulus):
            raise HTTPError(404, f"unknown stimulus {stimulus!r}: not in feature store {self.store.key}")
        features = self.store.read(stimulus)
        n_trs = self._n_trs(req.get("n_trs"), features.shape[0])
        return await self._run(RunRequest(features, subject, n_trs), stimulus)

    async def predict_npz(self, request: Request) -> dict[str, Any]:
        q = request.query_params
        unknown = sorted(set(q) - JSON_FIELDS)
        if unknown:
            raise HTTPError(400, f"unknown query parameters {unknown}; expected subject, n_trs, stimulus")
        label = q.get("stimulus")
        if label is not None and not re.fullmatch(r"[A-Za-z0-9._-]{1,128}", label):
            raise HTTPError(400, "query parameter 'stimulus' (a label) must match [A-Za-z0-9._-]{1,128}")
        subject = q.get("subject")
        if not subject:
            raise HTTPError(400, "query parameter 'subject' is required")
        self._check_subject(subject)
        body = await self._body(request)
        try:
            with np.load(io.BytesIO(body), allow_pickle=False) as z:
                if "features" not in z.files:
                    raise HTTPError(400, f"npz holds {z.files}; expected an array named 'features'")
                features = z["features"]
        except HTTPError:
            raise
        except ValueError as e:
            raise HTTPError(400, f"npz array refused ({e}); object arrays are not accepted") from None
        except (OSError, zipfile.BadZipFile, EOFError) as e:
            raise HTTPError(400, f"body is not an .npz file ({e})") from None
        if features.dtype not in (np.float16, np.float32):
            raise HTTPError(422, f"features: dtype {features.dtype}, expected float16 or float32")
        n_trs = self._n_trs(q.get("n_trs"), features.shape[0] if features.ndim == 4 else 1)
        return await self._run(RunRequest(features, subject, n_trs), label)

    # --------------------------------------------------------------- helpers

    def _check_subject(self, subject: str) -> None:
        if subject not in self.predictor.subjects:
            raise HTTPError(422, f"unknown subject {subject!r}; expected one of {self.predictor.subjects}")

    def _n_trs(self, value: Any, n_frames: int) -> int:
        if value is None:
            return self.predictor.default_n_trs(n_frames)
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100_000:
            raise HTTPError(422, f"n_trs must be an integer in [1, 100000], got {value!r}")
        return value

    async def _run(self, req: RunRequest, stimulus: str | None) -> dict[str, Any]:
        try:
            self.predictor.check_run(req.features, req.subject, req.n_trs)
        except DataError as e:
            raise HTTPError(422, str(e)) from None
        pred = await self.predict_batch(req)
        return {"subject": req.subject, "stimulus": stimulus, "shape": list(pred.shape), "predictions": pred}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def predict_batch(self, reqs: list[RunRequest]) -> list[np.ndarray]:
        return await asyncio.to_thread(self.predictor.predict_runs, reqs)


def _npy_response(result: dict[str, Any]) -> Response:
    """Predictions as a ``.npy`` body (float32, no pickle); the other fields as ``x-mirage-*`` headers."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(result["predictions"], dtype=np.float32), allow_pickle=False)
    headers = {"x-mirage-subject": result["subject"], "x-mirage-shape": ",".join(map(str, result["shape"]))}
    if result.get("stimulus"):
        headers["x-mirage-stimulus"] = result["stimulus"]
    return Response(buf.getvalue(), media_type=NPY_MEDIA_TYPE, headers=headers)


def deployment_options(cfg: Config) -> dict[str, Any]:
    """Serve deployment options from ``cfg.serve`` (fixed replicas, or autoscaling when max > initial)."""
    s = cfg.serve
    opts: dict[str, Any] = {
        "max_ongoing_requests": s.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": s.cpus_per_replica, "num_gpus": s.gpus_per_replica},
    }
    if s.max_replicas > s.replicas:
        opts["autoscaling_config"] = {
            "min_replicas": s.replicas,
            "initial_replicas": s.replicas,
            "max_replicas": s.max_replicas,
            "target_ongoing_requests": s.target_ongoing_requests,
        }
    else:
        opts["num_replicas"] = s.replicas
    return opts


def make_app(cfg: Config, model_uri: str):
    """The bound Serve application for ``model_uri`` with a resolved config."""
    dep = serve.deployment(MirageService, name="mirage", **deployment_options(cfg))
    return dep.bind(model_uri, cfg.to_dict())


def build_app(args: dict[str, Any]):
    """Application builder for ``serve run`` / RayService ``import_path``.

    ``args``: ``model`` (URI, required), ``config`` (preset or YAML path, default demo) and
    ``overrides`` (list of ``key=value``).
    """
    if "model" not in args:
        raise MirageError("serve app args: 'model' (a model URI) is required")
    cfg = resolve_paths(load_config(args.get("config"), list(args.get("overrides", []))))
    return make_app(cfg, str(args["model"]))


def run_server(cfg: Config, model_uri: str, blocking: bool = True) -> str:
    """Start Serve on ``cfg.serve.host:port`` and deploy the app; returns the base URL.

    With ``blocking`` the call serves until interrupted, then shuts Serve down.
    """
    from mirage.distributed.cluster import init_ray

    init_ray(cfg.ray)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(make_app(cfg, model_uri), name="mirage", route_prefix="/")
    url = f"http://{cfg.serve.host}:{cfg.serve.port}"
    if blocking:
        print(f"serving {model_uri} at {url} (Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(3600)
        finally:
            serve.shutdown()
    return url
