"""The name of one run: (subject, stimulus, repeat).

A subject may see a stimulus more than once (Movie10's ``life`` and ``figures`` runs); the
``repeat``-th viewing is named ``<stimulus>#<repeat>`` (``s06e01a``, ``life01#2``). The name
carries no subject: files key runs ``{subject: {name: array}}`` (the Algonauts submission
pickle, the per-epoch validation ``.npz``), and :func:`nest` / :func:`flatten` convert at
that boundary.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from mirage.errors import DataError

T = TypeVar("T")

_NAME = re.compile(r"^(?P<stimulus>[^#\s/]+?)(?:#(?P<repeat>[1-9]\d*)|_run-(?P<run>[1-9]\d*))?$")
_EPISODE = re.compile(r"^(.*e\d+)[a-z]$")


@dataclass(frozen=True, order=True)
class RunKey:
    """One run: ``subject`` (``sub-01``), ``stimulus`` id (``s06e01a``), ``repeat`` (1 = first viewing)."""

    subject: str
    stimulus: str
    repeat: int = 1

    def __post_init__(self) -> None:
        if not self.stimulus or "#" in self.stimulus or "/" in self.stimulus:
            raise DataError(f"run key: stimulus {self.stimulus!r}; expected a stimulus id such as 's06e01a'")
        if isinstance(self.repeat, bool) or not isinstance(self.repeat, int) or self.repeat < 1:
            raise DataError(f"run key {self.subject}/{self.stimulus}: repeat {self.repeat!r}; expected an integer >= 1")

    @property
    def name(self) -> str:
        """``s06e01a`` for a first viewing, ``s06e01a#2`` for the second."""
        return self.stimulus if self.repeat == 1 else f"{self.stimulus}#{self.repeat}"

    @property
    def episode(self) -> str:
        """The episode of a Friends half (``s06e01a`` -> ``s06e01``); other stimuli are their own episode."""
        m = _EPISODE.match(self.stimulus)
        return m.group(1) if m else self.stimulus

    @classmethod
    def parse(cls, subject: str, name: str) -> RunKey:
        """The key of ``subject``'s run called ``name`` (``s06e01a``, ``s06e01a#2``).

        The h5 task form ``life01_run-2`` reads as the second viewing of ``life01``.

        Raises:
            DataError: ``name`` is not of that form.
        """
        m = _NAME.match(str(name))
        if not m:
            raise DataError(f"run name {name!r} of {subject}: expected <stimulus> or <stimulus>#<repeat>")
        return cls(subject, m.group("stimulus"), int(m.group("repeat") or m.group("run") or 1))


def run_keys(runs: Iterable[T], subject=lambda r: r.subject, stimulus=lambda r: r.stimulus_id) -> list[tuple[RunKey, T]]:
    """Key every run: its subject's ``n``-th run of a stimulus, in the given (release) order, is repeat ``n``.

    runs: e.g. :class:`mirage.data.layout.FmriRun` records.
    """
    seen: dict[tuple[str, str], int] = {}
    out = []
    for run in runs:
        sub, stim = subject(run), stimulus(run)
        n = seen[(sub, stim)] = seen.get((sub, stim), 0) + 1
        out.append((RunKey(sub, stim, n), run))
    return out


def nest(values: Mapping[RunKey, T]) -> dict[str, dict[str, T]]:
    """``{RunKey: x}`` -> ``{subject: {name: x}}`` (the layout of the prediction files)."""
    out: dict[str, dict[str, T]] = {}
    for key, value in values.items():
        out.setdefault(key.subject, {})[key.name] = value
    return out


def flatten(nested: Mapping[str, Mapping[str, Any]]) -> dict[RunKey, Any]:
    """``{subject: {name: x}}`` -> ``{RunKey: x}``; raises DataError on a name that is not a run name."""
    return {RunKey.parse(sub, name): value for sub, runs in nested.items() for name, value in runs.items()}
