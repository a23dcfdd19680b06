"""The sweep's state file (``<train.storage>/<sweep.name>.mirage.json``) and the config it belongs to.

The file holds the MLflow parent run id, the sweep's defining config (dotted key -> value) and its
hash, and, once the sweep ran to the end, the trial summary. It is replaced atomically
(:func:`mirage.atomic.write_text`), so an interrupted write leaves the previous state.

Defining config: every setting of the resolved config except those that say where things go or
how fast they run, which a resume may change freely (:data:`NOT_DEFINING`): output and storage
paths, tracking, Ray, Serve and ensemble settings, the feature store's location and extraction
throughput, Train worker count, CPUs and custom resources, retries, loader threads, the sweep's concurrency, driver CPUs
and trial runner, and whether a missing dataset may be generated (``data.synthetic``). ``sweep.space`` enters entry by entry (``sweep.space.<key>``). Resuming a sweep, or
reading a finished one, with another defining config is refused, naming each differing key.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from mirage.atomic import write_text
from mirage.config import Config, flatten
from mirage.errors import MirageError

NOT_DEFINING = (
    "outputs", "tracking", "ray", "serve", "ensemble",
    "train.name", "train.storage", "train.max_failures", "train.loader_threads", "train.num_workers",
    "train.cpus_per_worker", "train.worker_resources", "train.baseline",
    "sweep.name", "sweep.max_concurrent", "sweep.driver_cpus", "sweep.driver_resources", "sweep.trial_runner", "data.synthetic",
    "features.store", "features.local_files_only", "features.actors", "features.gpus_per_actor",
    "features.cpus_per_actor", "features.batch_size", "features.cutoffs_per_item", "features.pass_batch",
    "features.torch_threads", "features.resources",
)
"""Dotted keys (and the sections under them) that a resumed sweep may change."""


def _excluded(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in NOT_DEFINING)


def defining_config(cfg: Config) -> dict[str, Any]:
    """Dotted key -> JSON value of every setting that defines the sweep's results."""
    flat = flatten(cfg.to_dict())
    space = flat.pop("sweep.space", {}) or {}
    for k, spec in space.items():
        flat[f"sweep.space.{k}"] = spec
    return {k: v for k, v in sorted(flat.items()) if not _excluded(k)}


def config_hash(defining: dict[str, Any]) -> str:
    """SHA-256 (first 16 hex) of the canonical JSON of a defining config."""
    blob = json.dumps(defining, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


_ABSENT = object()


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every key whose value differs (``<absent>`` where one side lacks it)."""

    def show(v: Any) -> str:
        return "<absent>" if v is _ABSENT else json.dumps(v, sort_keys=True, default=str)

    out = []
    for k in sorted(set(old) | set(new)):
        a, b = show(old.get(k, _ABSENT)), show(new.get(k, _ABSENT))
        if a != b:
            out.append(f"{k}: {a} -> {b}")
    return out


def state_path(cfg: Config) -> Path:
    """The state file of ``cfg.sweep.name``."""
    return Path(cfg.train.storage) / f"{cfg.sweep.name}.mirage.json"


def read_state(cfg: Config) -> dict[str, Any]:
    """The saved state ({} when there is none).

    Raises:
        MirageError: the file is not a JSON object.
    """
    p = state_path(cfg)
    if not p.is_file():
        return {}
    try:
        state = json.loads(p.read_text())
    except ValueError as e:
        raise MirageError(f"sweep state {p} is not valid JSON ({e}); expected the file `mirage sweep` writes") from None
    if not isinstance(state, dict):
        raise MirageError(f"sweep state {p} holds a {type(state).__name__}; expected a JSON object")
    return state


def write_state(cfg: Config, state: dict[str, Any]) -> Path:
    """Replace the state file atomically with ``state`` plus the defining config and its hash."""
    defining = defining_config(cfg)
    full = {**state, "name": cfg.sweep.name, "config_hash": config_hash(defining), "config": defining}
    return write_text(state_path(cfg), json.dumps(full, indent=2, default=str))


def check_same_config(cfg: Config, state: dict[str, Any]) -> None:
    """Refuse a saved sweep whose defining config differs from ``cfg``'s.

    A state without a hash (written before hashes were recorded) is accepted with a warning.

    Raises:
        MirageError: the hashes differ; the message lists each differing key, old -> new.
    """
    if not state:
        return
    saved = state.get("config_hash")
    if not saved:
        print(f"[mirage] warning: sweep state {state_path(cfg)} records no config hash; "
              "its config cannot be compared with this one", file=sys.stderr, flush=True)
        return
    defining = defining_config(cfg)
    if saved == config_hash(defining):
        return
    changes = config_changes(state.get("config") or {}, defining) or ["(saved config not recorded)"]
    raise MirageError(
        f"sweep {cfg.sweep.name!r} was run with another config ({state_path(cfg)}, config hash {saved} "
        f"vs {config_hash(defining)}): " + "; ".join(changes)
        + "; expected the same config to resume or reuse it, or a new --set sweep.name=<name> for a new sweep"
    )
