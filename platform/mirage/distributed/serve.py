"""Ray Serve app: whole-run predictions over HTTP with the same Predictor as batch prediction.

A FastAPI ingress (OpenAPI UI at ``/docs``, schema at ``/openapi.json``); JSON responses, and
every client error is a 4xx with ``{"error": message}`` naming no server path:

- ``GET /healthz`` -> model, subjects, parcels, feature store key.
- ``POST /v1/predict`` with ``{"subject": "sub-01", "stimulus": "s07e01a", "n_trs": 460}``
  (``n_trs`` optional: the TRs the stimulus' features span) -> ``{"subject", "stimulus",
  "shape", "predictions"}`` from the feature store.
- ``POST /v1/predict/features?subject=sub-01[&n_trs=...][&stimulus=label]`` with an ``.npy``
  body, or an ``.npz`` holding ``features``, of (n_frames, 3, n_layers, dim) float16/float32,
  for stimuli outside the store. Shape, dtype and uncompressed size come from the ``.npy``
  header and are checked before anything is inflated (:mod:`mirage.payload`); no pickle.

``n_trs`` is bounded by the frames the features cover (``serve.extra_trs`` past them). The
response's form follows ``Accept`` (:func:`~mirage.distributed.serve_api.negotiate`): JSON by
default and for ``*/*``; ``application/x-npy`` (float32, or float16 with ``;dtype=float16``) or
``application/vnd.apache.arrow.stream`` for a binary body with subject, stimulus, shape and dtype
in ``x-mirage-*`` headers; 406 naming the offers when none is acceptable. Every answer carries a
``Server-Timing`` header (body upload, decode, queue, predict, encode, total in ms; the batch
size it ran in).

Requests are validated one by one, then grouped with ``@serve.batch`` so that the windows of
several runs share forward passes. Body decoding and response encoding run on a pool of
``serve.io_threads`` threads and the forward passes on another thread, so the replica's event
loop keeps accepting requests while they run. A replica answers 408 to a request not done within
``serve.request_timeout_s`` (upload included), whatever timeout headers the client sends; the
HTTP proxy drops it after twice that. Replicas, autoscaling, batch size and the payload
limits come from ``cfg.serve``; the HTTP proxy binds ``cfg.serve.host`` (127.0.0.1 by default).
"""


import asyncio
import functools
import logging
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import ray
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from mirage.config import MODALITIES, Config, load_config, resolve_paths
from mirage.distributed.cluster import check_cluster_gpus, init_ray
from mirage.distributed.serve_api import (
    FeaturesQuery,
    Health,
    HTTPError,
    PredictRequest,
    encode_prediction,
    error_responses,
    negotiate,
    parse_json_object,
    prediction_content,
    redact,
    validate,
    validation_message,
)
from mirage.errors import DataError, FeatureStoreError, MirageError, PayloadError, PayloadTooLargeError
from mirage.payload import FeatureSpec, read_features
from mirage.predictor import RunRequest, open_model_store
from mirage.tracking.models import load_predictor

ROUTES = {
    "/healthz": "GET", "/v1/predict": "POST", "/v1/predict/features": "POST", "/docs": "GET", "/openapi.json": "GET",
}
logger = logging.getLogger("ray.serve")

app = FastAPI(
    title="MIRAGE",
    summary="fMRI encoding model predictions: one run per request, batched across requests.",
    docs_url="/docs",
    redoc_url=None,
)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


@app.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _error(422, validation_message(exc.errors(), list(FeaturesQuery.model_fields)))


@app.exception_handler(StarletteHTTPException)
async def _routing_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    path = request.url.path.rstrip("/") or "/"
    if exc.status_code == 404:
        return _error(404, f"no route {path}; expected one of {sorted(ROUTES)}")
    if exc.status_code == 405:
        allowed = ROUTES.get(path) or (exc.headers or {}).get("allow", "")
        return _error(405, f"{path} accepts {allowed}, got {request.method}")
    return _error(exc.status_code, str(exc.detail))


@app.exception_handler(Exception)
async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("request %s %s failed", request.method, request.url.path)
    return _error(500, "internal error; the server log has the details")


def model_label(source: str) -> str:
    """A model's source as clients may see it: URIs as they are, local directories by name."""
    return source if source.startswith(("models:/", "runs:/")) else Path(source).name


def server_timing(timing: dict[str, float]) -> str:
    """A ``Server-Timing`` header value: each stage in ms, and the batch size as ``batch;desc=N``."""
    parts = [f"{k};dur={v * 1000:.2f}" for k, v in timing.items() if k != "batch"]
    if "batch" in timing:
        parts.append(f'batch;desc="{int(timing["batch"])}"')
    return ", ".join(parts)


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


# Serve freezes the app (and what its routes reference) when the class is decorated: every
# module-level name the class uses is defined above this line.
@serve.ingress(app)
class MirageService:
    """One Serve replica: a Predictor, the feature store and request validation."""

    def __init__(self, model_uri: str, cfg_tree: dict[str, Any]):
        cfg = Config.model_validate(cfg_tree)
        self.cfg = cfg
        s = cfg.serve
        self.max_bytes = int(s.max_payload_mb * 1024 * 1024)
        self.max_json_bytes = int(s.max_json_kb * 1024)
        self.max_array_bytes = int(s.max_uncompressed_mb * 1024 * 1024)
        device = "cuda" if s.gpus_per_replica > 0 else "cpu"
        self.predictor = load_predictor(
            model_uri, tracking_uri=cfg.tracking.uri, device=device, window_batch=s.window_batch
        )
        self.spec = FeatureSpec(len(MODALITIES), self.predictor.min_layers, self.predictor.dim)
        self.store = open_model_store(self.predictor, cfg.features.store)
        self.server_roots = [
            cfg.features.store, cfg.data.root, cfg.outputs, model_uri, self.predictor.source,
            str(self.store.root) if self.store is not None else "", tempfile.gettempdir(), str(Path.home()),
        ]
        self.io_pool = ThreadPoolExecutor(s.io_threads, thread_name_prefix="mirage-io")
        self.predict_batch.set_max_batch_size(s.max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(s.batch_wait_timeout_s)

    # ---------------------------------------------------------------- routes

    @app.get("/healthz", response_model=Health, summary="Model, subjects and feature store of this server.")
    async def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "model": model_label(self.predictor.source),
            "subjects": self.predictor.subjects,
            "n_parcels": self.predictor.n_parcels,
            "feature_key": self.store.key if self.store is not None else None,
        }

    @app.post(
        "/v1/predict",
        summary="Predict a run of a stimulus in the model's feature store.",
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/json": {"schema": PredictRequest.model_json_schema()}}}},
        responses={200: prediction_content(), **error_responses(400, 404, 406, 408, 413, 422)},
    )
    async def predict(self, request: Request) -> Response:
        return await self._answer(request, functools.partial(self._predict_stored, request))

    @app.post(
        "/v1/predict/features",
        summary="Predict a run from posted features: an .npy body, or an .npz holding 'features'.",
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}},
        responses={200: prediction_content(), **error_responses(400, 406, 408, 413, 422)},
    )
    async def predict_features(self, request: Request, query: Annotated[FeaturesQuery, Query()]) -> Response:
        return await self._answer(request, functools.partial(self._predict_posted, request, query))

    # ------------------------------------------------------------- handlers

    async def _predict_stored(self, request: Request, timing: dict[str, float]) -> dict[str, Any]:
        fields = list(PredictRequest.model_fields)
        t = time.perf_counter()
        body = await self._body(request, self.max_json_bytes, f"serve.max_json_kb={self.cfg.serve.max_json_kb}")
        timing["body"] = time.perf_counter() - t
        req = validate(PredictRequest, parse_json_object(body, fields))
        self._check_subject(req.subject)
        if self.store is None:
            raise HTTPError(
                404, "this server holds no feature store of its model; post features to /v1/predict/features"
            )
        if not self.store.has(req.stimulus):
            raise HTTPError(404, f"unknown stimulus {req.stimulus!r}: not in feature store {self.store.key}")
        try:
            t = time.perf_counter()
            features = await self._off_loop(self.store.read, req.stimulus)
            timing["decode"] = time.perf_counter() - t
        except FeatureStoreError:
            logger.exception("feature store read of %r failed", req.stimulus)
            raise HTTPError(500, f"stimulus {req.stimulus!r}: the server's stored features are unreadable") from None
        n_trs = self._n_trs(req.n_trs, features.shape[0])
        return await self._run(RunRequest(features, req.subject, n_trs), req.stimulus, timing)

    async def _predict_posted(self, request: Request, query: FeaturesQuery, timing: dict[str, float]) -> dict[str, Any]:
        self._check_subject(query.subject)
        t = time.perf_counter()
        body = await self._body(request, self.max_bytes, f"serve.max_payload_mb={self.cfg.serve.max_payload_mb}")
        timing["body"] = time.perf_counter() - t
        t = time.perf_counter()
        features = await self._off_loop(read_features, body, self.spec, self.max_array_bytes)
        timing["decode"] = time.perf_counter() - t
        n_trs = self._n_trs(query.n_trs, features.shape[0])
        return await self._run(RunRequest(features, query.subject, n_trs), query.stimulus, timing)

    async def _answer(self, request: Request, handler) -> Response:
        """Negotiate the response form, run ``handler(timing)`` and encode its result, all within
        ``serve.request_timeout_s``; client errors become 4xx envelopes."""
        timeout = self.cfg.serve.request_timeout_s
        timing: dict[str, float] = {}
        start = time.perf_counter()

        async def work() -> tuple[bytes, dict[str, str]]:
            rep = negotiate(request.headers.get("accept"))
            result = await handler(timing)
            t = time.perf_counter()
            encoded = await self._off_loop(encode_prediction, result, rep)
            timing["encode"] = time.perf_counter() - t
            return encoded

        try:
            body, headers = await asyncio.wait_for(work(), timeout)
        except TimeoutError:
            return _error(408, f"request not completed within serve.request_timeout_s={timeout}")
        except HTTPError as e:
            return _error(e.status, redact(e.message, self.server_roots))
        except PayloadTooLargeError as e:
            return _error(413, redact(str(e), self.server_roots))
        except PayloadError as e:
            return _error(400, redact(str(e), self.server_roots))
        except DataError as e:
            return _error(422, redact(str(e), self.server_roots))
        except MirageError:
            logger.exception("request %s failed", request.url.path)
            return _error(500, "internal error; the server log has the details")
        timing["total"] = time.perf_counter() - start
        return Response(body, headers={**headers, "server-timing": server_timing(timing)})

    async def _off_loop(self, fn, *args: Any) -> Any:
        """``fn(*args)`` on the replica's I/O threads, so the event loop stays free."""
        return await asyncio.get_running_loop().run_in_executor(self.io_pool, functools.partial(fn, *args))

    async def _body(self, request: Request, limit: int, setting: str) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isascii() or not declared.isdigit() or int(declared) > limit):
            raise HTTPError(413, f"payload of {declared[:20]} bytes exceeds {setting}")
        chunks, size = [], 0
        async for chunk in request.stream():
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise HTTPError(413, f"payload exceeds {setting}")
        return b"".join(chunks)

    # --------------------------------------------------------------- helpers

    def _check_subject(self, subject: str) -> None:
        if subject not in self.predictor.subjects:
            raise HTTPError(422, f"unknown subject {subject!r}; expected one of {self.predictor.subjects}")

    def _n_trs(self, value: int | None, n_frames: int) -> int:
        """``value`` (None: the TRs the frames span), at most ``serve.extra_trs`` past those."""
        spanned = self.predictor.default_n_trs(n_frames)
        if value is None:
            return spanned
        most = spanned + self.cfg.serve.extra_trs
        if value > most:
            raise HTTPError(
                422,
                f"n_trs={value}: {n_frames} feature frames span {spanned} TRs; expected at most {most} "
                f"(serve.extra_trs={self.cfg.serve.extra_trs})",
            )
        return value

    async def _run(self, req: RunRequest, stimulus: str | None, timing: dict[str, float]) -> dict[str, Any]:
        try:  # a NaN scan of the features: off the loop, as it reads them whole
            await self._off_loop(self.predictor.check_run, req.features, req.subject, req.n_trs)
        except DataError as e:
            raise HTTPError(422, str(e)) from None
        queued = time.perf_counter()
        pred, batch, started, done = await self.predict_batch(req)
        timing.update(queue=started - queued, predict=done - started, batch=batch)
        return {"subject": req.subject, "stimulus": stimulus, "shape": list(pred.shape), "predictions": pred}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def predict_batch(self, reqs: list[RunRequest]) -> list[tuple[np.ndarray, int, float, float]]:
        """Runs grouped by Serve -> per run: (n_trs, n_parcels) predictions, batch size, start and end times."""
        started = time.perf_counter()
        preds = await asyncio.to_thread(self.predictor.predict_runs, reqs)
        done = time.perf_counter()
        return [(p, len(reqs), started, done) for p in preds]


def http_options(cfg: Config) -> dict[str, Any]:
    """Ray's HTTP proxy options: bind address and a backstop timeout (twice the replica's).

    A client can lift the proxy's timeout with Ray's ``x-request-timeout-seconds`` header; the
    replica's own ``serve.request_timeout_s`` still holds.
    """
    s = cfg.serve
    return {"host": s.host, "port": s.port, "request_timeout_s": 2 * s.request_timeout_s}


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

    With ``blocking`` the call serves until interrupted, then shuts Serve down. A port another
    process holds (``mirage serve`` checks it before Ray starts, see :mod:`mirage.preflight`) is
    reported as a ``MirageError`` when the proxy fails to bind it.
    """
    init_ray(cfg.ray)
    check_cluster_gpus(cfg, "serve")  # a GPU request the cluster can never meet would wait forever
    try:
        serve.start(http_options=http_options(cfg))
    except ray.exceptions.RayTaskError as e:
        if "Failed to bind" not in str(e):
            raise
        raise MirageError(
            f"serve.port: Serve's HTTP proxy cannot listen on {cfg.serve.host}:{cfg.serve.port} (in use on a "
            "node of the cluster); choose another port (serve.port=<port>)"
        ) from None
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
