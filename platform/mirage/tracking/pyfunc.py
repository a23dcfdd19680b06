"""An MLflow pyfunc wrapper that rebuilds a MIRAGE predictor from its artifact directory.

The logged model holds the predictor directory (an exported model or an ensemble directory)
as the artifact ``predictor``; ``load_context`` rebuilds the PyTorch classes from it with
:meth:`mirage.predictor.Predictor.from_path` (weights from safetensors, never a pickle).

``predict`` takes one request or several:

- a dict ``{"subject": "sub-01", "features": array (n_frames, 3, n_layers, dim), "n_trs": int}``
  -> float32 array (n_trs, n_parcels);
- a list of such dicts, or a pandas DataFrame with columns ``subject``, ``features``, ``n_trs``
  (one row per request) -> list of arrays, the runs' windows batched together
  (:meth:`mirage.predictor.Predictor.predict_runs`).

A training run's model (:func:`mirage.tracking.trained.log_trained_model`) carries a signature
(``subject`` string, ``features`` 4-D array, ``n_trs`` long); MLflow enforces it by turning a dict
into a one-row DataFrame, so there a single request returns a list holding one array.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import numpy as np

from mirage.errors import MirageError
from mirage.predictor import Predictor, RunRequest

REQUIRED_KEYS = ("subject", "features", "n_trs")


def pip_requirements() -> list[str]:
    """Requirements of the logged model (pinned to the versions installed here)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("mlflow", "torch", "numpy", "safetensors", "pyyaml", "pydantic", "pandas"):
        try:
            out.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            out.append(pkg)
    return out


def _request(req: dict[str, Any]) -> RunRequest:
    missing = [k for k in REQUIRED_KEYS if k not in req]
    if missing:
        raise MirageError(f"pyfunc request: missing keys {missing}; expected {list(REQUIRED_KEYS)}")
    feats = np.asarray(req["features"], dtype=np.float32)
    if feats.ndim != 4 or feats.shape[1] != 3:
        raise MirageError(f"pyfunc request: features must be (n_frames, 3, n_layers, dim), got {feats.shape}")
    if not np.isfinite(feats).all():
        raise MirageError("pyfunc request: features contain NaN or inf")
    n_trs = int(req["n_trs"])
    if n_trs < 1:
        raise MirageError(f"pyfunc request: n_trs must be >= 1, got {n_trs}")
    return RunRequest(feats, str(req["subject"]), n_trs)


class MiragePyfunc(mlflow.pyfunc.PythonModel):
    """pyfunc model around :class:`mirage.predictor.Predictor`."""

    def load_context(self, context) -> None:
        self.predictor = Predictor.from_path(context.artifacts["predictor"])

    def predict(self, context, model_input, params=None):
        if isinstance(model_input, dict):
            return self.predictor.predict_runs([_request(model_input)])[0]
        if hasattr(model_input, "to_dict") and hasattr(model_input, "columns"):  # DataFrame
            model_input = model_input.to_dict(orient="records")
        if isinstance(model_input, list):
            return self.predictor.predict_runs([_request(r) for r in model_input])
        raise MirageError(
            f"pyfunc input must be a dict, a list of dicts or a DataFrame with columns {list(REQUIRED_KEYS)}, "
            f"got {type(model_input).__name__}"
        )
