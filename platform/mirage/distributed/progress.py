"""Per-epoch progress lines of ``mirage train``, printed as Ray Train registers each report."""

from __future__ import annotations

import sys
from typing import Any

from ray.train import UserCallback

from mirage.progress import epoch_line


class EpochLines(UserCallback):
    """Print :func:`mirage.progress.epoch_line` of rank 0's metrics after every report.

    Runs in the Train controller; Ray forwards its stderr to the driver's, one line per epoch
    (stdout stays for the command's result).
    """

    def __init__(self, epochs: int):
        self.epochs = epochs

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if metrics and "epoch" in metrics[0]:
            print(epoch_line(metrics[0], self.epochs), file=sys.stderr, flush=True)
