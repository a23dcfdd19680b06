"""The Serve API's request and response models, its error envelope and JSON body parsing.

Every client error is answered ``{"error": message}`` with a 4xx status; messages name the
field and what was expected, and never a server path (:func:`redact`). The response's
representation is negotiated from ``Accept`` (:func:`negotiate`) and encoded by
:func:`encode_prediction`. No Ray here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import orjson
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

LABEL_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"
JSON_INT_DIGITS = 18
"""Longest integer literal a JSON body may hold (an int64 has 19 digits)."""
QUERY_INT = re.compile(r"[0-9]{1,9}")


class HTTPError(Exception):
    """A client error: status code and message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# ------------------------------------------------------------------ requests


class PredictRequest(BaseModel):
    """``POST /v1/predict``: a stimulus of the model's feature store."""

    model_config = ConfigDict(extra="forbid", strict=True)

    subject: str = Field(max_length=64, description="Subject id the model was trained on, e.g. sub-01.")
    stimulus: str = Field(max_length=256, description="Stimulus id in the model's feature store, e.g. s07e01a.")
    n_trs: int | None = Field(
        None, ge=1,
        description="TRs to predict; default: the TRs the stimulus' frames span. At most those plus serve.extra_trs.",
    )


def _ascii_int(value: Any) -> Any:
    """A query integer: ASCII decimal digits only (no '٣', '²', '+5', '1_000' or ' 12')."""
    if isinstance(value, str) and not QUERY_INT.fullmatch(value):
        raise ValueError("expected a decimal integer of at most 9 ASCII digits")
    return value


class FeaturesQuery(BaseModel):
    """Query of ``POST /v1/predict/features`` (the body is the features file)."""

    model_config = ConfigDict(extra="forbid")

    subject: str = Field(max_length=64, description="Subject id the model was trained on, e.g. sub-01.")
    n_trs: Annotated[int | None, BeforeValidator(_ascii_int)] = Field(
        None, ge=1,
        description="TRs to predict; default: the TRs the posted frames span. At most those plus serve.extra_trs.",
    )
    stimulus: str | None = Field(None, pattern=LABEL_PATTERN, description="A label echoed in the response.")


# ----------------------------------------------------------------- responses


class Prediction(BaseModel):
    """Predictions of one run as JSON (binary bodies on request: :data:`REPRESENTATIONS`)."""

    subject: str = Field(description="Subject id.")
    stimulus: str | None = Field(description="Stimulus id or label.")
    shape: list[int] = Field(description="(n_trs, n_parcels).")
    predictions: list[list[float]] = Field(description="(n_trs, n_parcels) predicted BOLD.")


class Health(BaseModel):
    """``GET /healthz``."""

    status: str = Field(description="'ok' once the model is loaded.")
    model: str = Field(description="Model URI, or the model directory's name.")
    subjects: list[str] = Field(description="Subjects the model predicts.")
    n_parcels: int = Field(description="Parcels per prediction row.")
    feature_key: str | None = Field(description="Key of the feature store served by /v1/predict (None: none).")


class ErrorBody(BaseModel):
    """Every error response."""

    error: str = Field(description="What was wrong, where, and what was expected.")


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for error codes, all in the ``{"error": ...}`` envelope."""
    return {code: {"model": ErrorBody} for code in codes}


# ------------------------------------------------------- response formats


JSON_MEDIA_TYPE = "application/json"
NPY_MEDIA_TYPE = "application/x-npy"
ARROW_MEDIA_TYPE = "application/vnd.apache.arrow.stream"


@dataclass(frozen=True)
class Representation:
    """A response body the server can send: media type and prediction dtype (None: JSON numbers)."""

    media_type: str
    dtype: str | None = None

    def describe(self) -> str:
        return self.media_type + (f";dtype={self.dtype}" if self.dtype else "")


REPRESENTATIONS = (
    Representation(JSON_MEDIA_TYPE),
    Representation(NPY_MEDIA_TYPE, "float32"),
    Representation(NPY_MEDIA_TYPE, "float16"),
    Representation(ARROW_MEDIA_TYPE, "float32"),
    Representation(ARROW_MEDIA_TYPE, "float16"),
)
"""What ``Accept`` may ask for, in order of preference when it allows several equally (``*/*``: JSON)."""


def offered() -> str:
    return ", ".join(r.describe() for r in REPRESENTATIONS)


def _quality(text: str, item: str) -> float:
    try:
        q = float(text)
    except ValueError:
        q = -1.0
    if not 0.0 <= q <= 1.0:
        raise HTTPError(400, f"Accept: q={text[:20]!r} in {item[:60]!r}; expected a number from 0 to 1")
    return q


def negotiate(accept: str | None) -> Representation:
    """The representation ``accept`` (an HTTP ``Accept`` header, RFC 9110) prefers.

    Each offer takes the q of the most specific media range that matches it (a ``dtype=``
    parameter must name the offer's dtype; other parameters are ignored); the highest q wins,
    ties go to the earlier offer of :data:`REPRESENTATIONS`. No header or an empty one: JSON.

    Raises:
        HTTPError: 406 when no offer has q > 0 (the message lists the offers), 400 for a bad q.
    """
    if accept is None or not accept.strip():
        return REPRESENTATIONS[0]
    ranges = []  # (type, subtype, dtype or None, q)
    for item in accept.split(","):
        parts = [p.strip() for p in item.split(";")]
        kind, _, sub = parts[0].lower().partition("/")
        if not kind or not sub:
            continue
        params = dict(p.partition("=")[::2] for p in parts[1:] if "=" in p)
        params = {k.strip().lower(): v.strip().strip('"').lower() for k, v in params.items()}
        q = _quality(params.pop("q"), item) if "q" in params else 1.0
        ranges.append((kind, sub, params.get("dtype"), q))
    best, best_q = None, 0.0
    for rep in REPRESENTATIONS:
        kind, sub = rep.media_type.split("/")
        matched = None  # (specificity, q)
        for r_kind, r_sub, r_dtype, q in ranges:
            if r_kind not in ("*", kind) or r_sub not in ("*", sub) or (r_dtype is not None and r_dtype != rep.dtype):
                continue
            rank = (r_kind != "*") + (r_sub != "*") + (r_dtype is not None)
            if matched is None or rank > matched[0]:
                matched = (rank, q)
        if matched is not None and matched[1] > best_q:
            best, best_q = rep, matched[1]
    if best is None:
        raise HTTPError(406, f"Accept {accept[:120]!r} matches no response type; expected one of {offered()}")
    return best


def prediction_content() -> dict[str, Any]:
    """The OpenAPI entry of a 200 prediction: the JSON model and every binary form ``Accept`` may ask for."""
    binary = {"schema": {"type": "string", "format": "binary"}}
    return {
        "model": Prediction,
        "description": "JSON by default and for */*. Binary bodies (subject, stimulus, shape and dtype in "
        "x-mirage-* headers): Accept: application/x-npy (float32 .npy), application/x-npy;dtype=float16, "
        "application/vnd.apache.arrow.stream[;dtype=float16] (one record batch, column 'predictions' of "
        "n_trs fixed-size lists of n_parcels). 406 when Accept allows none of these.",
        "content": {NPY_MEDIA_TYPE: binary, ARROW_MEDIA_TYPE: binary},
    }


def encode_prediction(result: dict[str, Any], rep: Representation) -> tuple[bytes, dict[str, str]]:
    """A prediction's body and headers in representation ``rep``.

    ``result``: ``subject``, ``stimulus``, ``shape`` and ``predictions`` (n_trs, n_parcels)
    float32. JSON carries every field in the body (float32 numbers, shortest exact form); a
    binary body carries the array and the other fields travel as ``x-mirage-*`` headers (and, for
    Arrow, as schema metadata).
    """
    from mirage.payload import arrow_body, npy_body

    headers = {"content-type": rep.media_type, "vary": "Accept"}
    if rep.dtype is None:
        body = {**result, "predictions": np.ascontiguousarray(result["predictions"], dtype=np.float32)}
        return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), headers
    fields = {"subject": result["subject"], "shape": ",".join(map(str, result["shape"])), "dtype": rep.dtype}
    if result.get("stimulus"):
        fields["stimulus"] = result["stimulus"]
    headers.update({f"x-mirage-{k}": v for k, v in fields.items()})
    pred = np.asarray(result["predictions"])
    if rep.media_type == NPY_MEDIA_TYPE:
        return npy_body(pred, rep.dtype), headers
    return arrow_body(pred, rep.dtype, fields), headers


# ----------------------------------------------------------------- parsing


def _json_int(literal: str) -> int:
    if len(literal.lstrip("-")) > JSON_INT_DIGITS:
        raise ValueError(f"an integer of {len(literal.lstrip('-'))} digits; expected at most {JSON_INT_DIGITS}")
    return int(literal)


def _json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON; expected a finite number")


def parse_json_object(body: bytes, fields: Sequence[str]) -> dict[str, Any]:
    """A JSON object from a request body; any decoding failure is an HTTPError 400.

    Integers longer than ``JSON_INT_DIGITS`` digits, NaN/Infinity and nesting beyond the
    interpreter's recursion limit are refused while parsing.
    """
    expected = f"expected a JSON object with {list(fields)}"
    try:
        value = json.loads(body, parse_int=_json_int, parse_constant=_json_constant)
    except RecursionError:
        raise HTTPError(400, f"body: JSON nested too deeply; {expected}") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError and the hooks above
        raise HTTPError(400, f"body is not valid JSON ({_short(str(e))}); {expected}") from None
    if not isinstance(value, dict):
        raise HTTPError(400, f"body is a JSON {type(value).__name__}; {expected}")
    return value


def validation_message(errors: Iterable[dict[str, Any]], fields: Sequence[str] = ()) -> str:
    """One line from pydantic/FastAPI validation errors: ``where: what`` for each (inputs not echoed)."""
    parts = []
    for err in errors:
        where = ".".join(str(p) for p in err.get("loc", ())) or "body"
        if err.get("type") == "extra_forbidden":
            what = "unknown field" + (f"; expected one of {list(fields)}" if fields else "")
        elif err.get("type") == "missing":
            what = "required"
        else:
            what = _short(str(err.get("msg", "invalid")).removeprefix("Value error, "))
        parts.append(f"{where}: {what}")
    return "; ".join(parts) or "invalid request"


def validate(model: type[BaseModel], value: dict[str, Any]) -> BaseModel:
    """``model.model_validate`` with failures as HTTPError 422."""
    try:
        return model.model_validate(value)
    except ValidationError as e:
        raise HTTPError(422, validation_message(e.errors(), list(model.model_fields))) from None


def redact(message: str, roots: Iterable[str]) -> str:
    """``message`` with every server directory in ``roots`` replaced by ``<server>``."""
    for root in sorted({r.rstrip("/") for r in roots if r and len(r.rstrip("/")) > 1}, key=len, reverse=True):
        message = message.replace(root, "<server>")
    return message


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
