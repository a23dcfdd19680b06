"""``mirage config show``: the resolved config (preset, overrides, derived paths) as YAML or JSON."""

from __future__ import annotations

import argparse
import json

import yaml

from mirage.config import Config


def add_show_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of YAML")


def show(cfg: Config, a: argparse.Namespace) -> int:
    """Print the resolved config (after --config, --set and path resolution)."""
    tree = cfg.to_dict()
    if a.json:
        print(json.dumps(tree, indent=2))
    else:
        print(yaml.safe_dump(tree, sort_keys=False), end="")
    return 0
