"""Helpers shared by the tests that drive real runs: a run in a background thread, MLflow lookups."""

from __future__ import annotations

import threading
import time


def in_thread(fn):
    """Start ``fn()`` in a daemon thread; returns (thread, out) where ``out`` gets ``result`` or ``error``
    and ``done_at`` (``time.monotonic()`` when it returned)."""
    out: dict = {}

    def run():
        try:
            out["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e
        out["done_at"] = time.monotonic()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def mlflow_client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def run_artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    """Every artifact file path of a run (below ``path``)."""
    out = set()
    for a in client.list_artifacts(run_id, path):
        out |= run_artifacts(client, run_id, a.path) if a.is_dir else {a.path}
    return out
