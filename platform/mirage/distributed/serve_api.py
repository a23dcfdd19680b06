"""The Serve API's request and response models, its error envelope and JSON body parsing.

Every client error is answered ``{"error": message}`` with a 4xx status; messages name the
field and what was expected, and never a server path (:func:`redact`). No Ray here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from typing import Annotated, Any

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
    """Predictions of one run (JSON; with ``Accept: application/x-npy`` a float32 ``.npy`` body instead)."""

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
