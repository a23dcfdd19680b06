"""The demo's dataset and feature store for a benchmark, made once under its output folder."""

from __future__ import annotations

from pathlib import Path

from mirage.config import Config
from mirage.data.synth import write_synthetic
from mirage.features.extract import extract_all


def demo_inputs(cfg: Config) -> Config:
    """Write the synthetic dataset at ``cfg.data.root`` unless it is there, extract what the store lacks; returns ``cfg``."""
    if not (Path(cfg.data.root) / "_truth" / "truth.json").is_file():
        write_synthetic(cfg.data.root, cfg.data.synth, tr=cfg.data.tr)
    res = extract_all(cfg)
    if res.failed:
        raise SystemExit(f"extraction failed: {res.failed}")
    return cfg
