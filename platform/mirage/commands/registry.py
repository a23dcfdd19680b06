"""Every ``mirage`` subcommand: name, argument adder and handler, in the order ``--help`` lists them.

Add a command here (and its functions in a module of :mod:`mirage.commands`); :func:`mirage.cli.build_parser`
builds the parser from :data:`COMMANDS` alone.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from mirage.commands import config, data, experiment, extract, serve, sweep, train, video
from mirage.config import Config

Handler = Callable[[Config, argparse.Namespace], int]
"""(resolved config, parsed arguments) -> exit status."""


@dataclass(frozen=True)
class Command:
    """One subcommand.

    Attributes:
        name: words after ``mirage``; two words (``"data synth"``) nest under a group (``mirage data``).
        add_args: adds the command's own arguments to its parser.
        run: the handler; the first line of its docstring is the command's help.
    """

    name: str
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Handler

    @property
    def help(self) -> str:
        """One line, shown in ``mirage --help`` and as the command's description (the handler's summary)."""
        doc = " ".join((self.run.__doc__ or "").split("\n\n")[0].split())
        return doc[0].lower() + doc[1:].rstrip(".") if doc else ""


COMMANDS: tuple[Command, ...] = (
    Command("config show", config.add_show_args, config.show),
    Command("data synth", data.add_synth_args, data.synth),
    Command("data check", data.add_check_args, data.check),
    Command("extract", extract.add_extract_args, extract.extract),
    Command("features verify", extract.add_verify_args, extract.verify),
    Command("features one", extract.add_one_args, extract.one),
    Command("serve", serve.add_serve_args, serve.serve),
    Command("predict", serve.add_predict_args, serve.predict),
    Command("score", serve.add_score_args, serve.score),
    Command("sweep", sweep.add_sweep_args, sweep.sweep),
    Command("ensemble", sweep.add_ensemble_args, sweep.ensemble),
    Command("experiment run", experiment.add_run_args, experiment.run),
    Command("experiment report", experiment.add_report_args, experiment.report),
    Command("experiment list", experiment.add_list_args, experiment.list_experiments),
    Command("train", train.add_train_args, train.train),
    Command("baseline", train.add_baseline_args, train.baseline),
    Command("predict-video", video.add_args, video.predict_video_cmd),
)
"""Every subcommand of ``mirage``."""
