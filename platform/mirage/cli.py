"""The ``mirage`` command: parse arguments, build the config, call one library function.

Every subcommand accepts ``--config PRESET_OR_PATH`` and repeatable
``--set section.key=value``; user mistakes (``MirageError``) print as one line
on stderr with exit status 1, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from mirage.config import Config, load_config, resolve_paths
from mirage.errors import MirageError

Handler = Callable[[Config, argparse.Namespace], int]


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, help="preset name (demo, paper) or YAML path; default: demo")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set model.n_queries=8 (repeatable)",
    )


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Handler]] = {}


def command(name: str, help: str, add_args: Callable[[argparse.ArgumentParser], None] | None = None):
    """Register ``name`` (space-separated for nested: ``"data synth"``) with its handler."""

    def deco(fn: Handler) -> Handler:
        COMMANDS[name] = (help, add_args or (lambda p: None), fn)
        return fn

    return deco


# ------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mirage", description="MIRAGE brain-encoding platform")
    subs = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, (help_text, add_args, handler) in COMMANDS.items():
        parts = name.split()
        target = subs
        if len(parts) == 2:
            if parts[0] not in groups:
                gp = subs.add_parser(parts[0], help=f"{parts[0]} commands")
                groups[parts[0]] = gp.add_subparsers(dest="subcommand", required=True)
            target = groups[parts[0]]
        p = target.add_parser(parts[-1], help=help_text, description=help_text)
        add_args(p)
        _config_args(p)
        p.set_defaults(handler=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    _register_commands()
    args = build_parser().parse_args(argv)
    try:
        cfg = resolve_paths(load_config(args.config, args.overrides))
        return int(args.handler(cfg, args) or 0)
    except MirageError as e:
        print(f"mirage: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mirage: interrupted", file=sys.stderr)
        return 130


def _register_commands() -> None:
    """Import the modules that register the subcommands (``mirage.commands.*``)."""
    import mirage.commands  # noqa: F401


if __name__ == "__main__":
    # run as ``python -m mirage.cli``: commands register on the importable module, not __main__
    from mirage.cli import main as _main

    sys.exit(_main())
