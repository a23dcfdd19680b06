"""Where a trained model lives, told apart without loading it: a model directory's layout, or an
MLflow URI. Imports neither torch nor MLflow, so preflight checks stay fast.

Layouts: an ensemble (``ensemble.json`` + ``weights.npy`` + ``members/<i>/``), an exported model
(``model.safetensors`` + ``config.yaml`` + ``meta.json``), the published MIRAGE weights
(``model.safetensors`` + the reference trainer's ``config.yaml``).
"""

from __future__ import annotations

import os
from pathlib import Path

from mirage.errors import ModelLoadError

ENSEMBLE_FILE = "ensemble.json"
WEIGHTS_FILE = "weights.npy"
EXPORT_FILES = ("model.safetensors", "config.yaml", "meta.json")
PUBLISHED_FILES = ("model.safetensors", "config.yaml")
MLFLOW_SCHEMES = ("runs:/", "models:/")
"""URI prefixes of models held by an MLflow store."""


def is_mlflow_uri(uri: str) -> bool:
    """Whether ``uri`` names a model in an MLflow store (else it is a local path)."""
    return uri.startswith(MLFLOW_SCHEMES)


def model_kind(path: str | os.PathLike) -> str:
    """``"ensemble"``, ``"exported"`` or ``"published"`` for a model directory.

    Raises:
        ModelLoadError: the directory holds none of the three layouts.
    """
    p = Path(path)
    if not p.is_dir():
        raise ModelLoadError(f"{p}: model directory not found")
    if (p / ENSEMBLE_FILE).is_file():
        return "ensemble"
    if all((p / f).is_file() for f in EXPORT_FILES):
        return "exported"
    if all((p / f).is_file() for f in PUBLISHED_FILES):
        return "published"
    raise ModelLoadError(
        f"{p}: not a model directory; expected {ENSEMBLE_FILE} (ensemble), {'+'.join(EXPORT_FILES)} "
        f"(exported model) or {'+'.join(PUBLISHED_FILES)} (published MIRAGE weights)"
    )


def find_model_dir(root: str | os.PathLike) -> Path:
    """The shallowest model directory under ``root`` (ensembles first), e.g. inside a downloaded MLflow model."""
    root = Path(root)
    candidates: list[tuple[int, int, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        names = set(filenames)
        rank = 0 if ENSEMBLE_FILE in names else 1 if set(EXPORT_FILES) <= names else 2 if set(PUBLISHED_FILES) <= names else None
        if rank is not None:
            candidates.append((rank, len(Path(dirpath).relative_to(root).parts), Path(dirpath)))
    if not candidates:
        raise ModelLoadError(f"{root}: no exported model, ensemble or published MIRAGE weights found inside")
    return min(candidates)[2]
