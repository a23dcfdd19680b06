"""``mirage data synth`` and ``mirage data check``."""

from __future__ import annotations

import argparse
from typing import Any

from mirage.config import Config


def add_synth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="dataset directory to write")
    p.add_argument("--episodes", type=int, default=None, help="episodes per Friends season")
    p.add_argument("--seconds", type=float, default=None, help="duration of every run in seconds")
    p.add_argument("--parcels", type=int, default=None, help="parcels in the fMRI files")
    p.add_argument("--seed", type=int, default=None, help="random seed")


def synth(cfg: Config, a: argparse.Namespace) -> int:
    """Write a synthetic dataset in the Algonauts 2025 layout."""
    updates: dict[str, Any] = {
        f"data.synth.{f}": getattr(a, f) for f in ("episodes", "seconds", "parcels", "seed") if getattr(a, f) is not None
    }
    cfg = cfg.with_overrides(updates) if updates else cfg
    from mirage.data.synth import write_synthetic  # h5py and PyAV take ~0.3 s: not for `mirage --help`

    path = write_synthetic(a.out, cfg.data.synth, tr=cfg.data.tr, progress=True)
    print(f"synthetic dataset written to {path}")
    return 0


def add_check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", help="dataset directory in the Algonauts 2025 layout")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def check(cfg: Config, a: argparse.Namespace) -> int:
    """Validate a dataset directory."""
    from mirage.data.check import check_dataset, print_report  # h5py and PyAV take ~0.3 s: not for `mirage --help`

    report = check_dataset(a.root, cfg.data, progress=True, media_tolerance_s=cfg.features.media_tolerance_s)
    print_report(report, as_json=a.json)
    return 0 if report["ok"] else 1
