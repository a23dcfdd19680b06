"""Progress output of the commands that work in this process, always on stderr (stdout stays for results).

On a terminal a rich progress bar; otherwise (logs, pipes, ``ray job submit``) one line per item
once it is done, with the seconds since the first began, so that a log shows progress as it happens:

    extract 3/10 s01e02a (41.2 s)
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Collection, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def tracked(
    items: Collection[T], label: str, enabled: bool = True, name: Callable[[T], Any] = str
) -> Iterator[T]:
    """Yield ``items`` in order, showing ``label done/total`` as each one is done.

    Args:
        items: what is iterated (its ``len`` is the total).
        label: what the bar or line starts with (``extract``, ``baseline native_linear``).
        enabled: ``False`` yields the items and shows nothing.
        name: how an item is named on its line (default ``str``).
    """
    if not enabled:
        yield from items
        return
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=Console(stderr=True)) as bar:
            yield from bar.track(items, total=len(items), description=label)
        return
    total, t0 = len(items), time.perf_counter()
    for i, item in enumerate(items, 1):
        yield item
        print(f"{label} {i}/{total} {name(item)} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)


def epoch_line(metrics: dict[str, Any], epochs: int) -> str:
    """One line per training epoch from the metrics a worker reports (epochs count from 1 here).

    ``epoch 3/6: train loss 0.8123 (4.2 s), val r 0.1234, best 0.1300``; the seconds are the
    training pass's (``epoch_s``).
    """
    def num(key: str) -> float:
        return float(metrics.get(key, float("nan")))

    return (
        f"epoch {int(metrics['epoch']) + 1}/{epochs}: train loss {num('train_loss'):.4f} ({num('epoch_s'):.1f} s), "
        f"val r {num('val_r'):.4f}, best {num('best_val_r'):.4f}"
    )
