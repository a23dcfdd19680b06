"""The ``mirage`` command: parse arguments, build the config, call one library function.

The subcommands are the entries of :data:`mirage.commands.registry.COMMANDS`.

Every subcommand accepts ``--config PRESET_OR_PATH`` and repeatable
``--set section.key=value``; user mistakes (``MirageError``) print as one line
on stderr with exit status 1, without a traceback. Any other error, and a MirageError raised
inside a Ray worker, prints the same one line naming a log file with the full trace
(:mod:`mirage.failures`); ``--debug`` also prints the trace.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version

from mirage.commands.registry import COMMANDS, Command
from mirage.config import load_config, resolve_paths
from mirage.failures import error_line

DEBUG_HELP = "on an error, also print its full traceback (a worker's or unexpected error's is logged under <outputs>/logs)"
DISTRIBUTION = "mirage-platform"


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, help="preset name (demo, paper) or YAML path; default: demo")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set model.n_queries=8 (repeatable)",
    )
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)


# ------------------------------------------------------------------ parser


def version() -> str:
    """The installed distribution's version (``mirage-platform``)."""
    try:
        return dist_version(DISTRIBUTION)
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser(commands: Sequence[Command] = COMMANDS) -> argparse.ArgumentParser:
    """The parser of ``mirage``: one subparser per entry of ``commands``, each with the common options."""
    parser = argparse.ArgumentParser(prog="mirage", description="MIRAGE brain-encoding platform")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    subs = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for cmd in commands:
        parts = cmd.name.split()
        target = subs
        if len(parts) == 2:
            if parts[0] not in groups:
                gp = subs.add_parser(parts[0], help=f"{parts[0]} commands")
                groups[parts[0]] = gp.add_subparsers(dest="subcommand", required=True)
            target = groups[parts[0]]
        p = target.add_parser(parts[-1], help=cmd.help, description=cmd.help)
        cmd.add_args(p)
        _config_args(p)
        p.set_defaults(handler=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = None
    try:
        cfg = resolve_paths(load_config(args.config, args.overrides))
        return int(args.handler(cfg, args) or 0)
    except Exception as e:  # noqa: BLE001 - every error ends as one line; the trace goes to a log
        if getattr(args, "debug", False):
            traceback.print_exception(e, file=sys.stderr)
        print(error_line(e, cfg.outputs if cfg is not None else None), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mirage: interrupted", file=sys.stderr)
        return 130



if __name__ == "__main__":
    sys.exit(main())
