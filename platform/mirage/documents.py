"""Small JSON and YAML files read whole, with errors that name the file and what was expected."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from mirage.errors import MirageError


def read_mapping(path: str | os.PathLike, error: type[MirageError], missing: str | None = None) -> dict[str, Any]:
    """The mapping in a ``.json`` file, or a ``.yaml``/``.yml`` file.

    Args:
        error: the error class raised (ModelLoadError, FeatureStoreError, ConfigError, ...).
        missing: the message when the file does not exist (default: ``<path>: not found``).

    Raises:
        ``error``: the file is missing or unreadable, not valid JSON/YAML, or not a mapping at the top level.
    """
    path = Path(path)
    if not path.is_file():
        raise error(missing or f"{path}: not found")
    kind = "JSON" if path.suffix == ".json" else "YAML"
    try:
        text = path.read_text()
        tree = json.loads(text) if kind == "JSON" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
        raise error(f"{path}: not valid {kind} ({e})") from None
    if kind == "YAML" and tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise error(f"{path}: expected a mapping at the top level, got {type(tree).__name__}")
    return tree
