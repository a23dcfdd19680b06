"""Analysis of a finished sweep: parameter importance (Optuna fANOVA) and the search's figures.

Pure core: no Ray, no MLflow. Input is one ``(params, value)`` pair per trial, ``params`` keyed
by the dotted paths of ``cfg.sweep.space`` and ``value`` the trial's best metric (``None`` for a
trial that failed or reported nothing).

Importance: the trials are replayed into an in-memory Optuna study, with each dimension's
distribution rebuilt from its :class:`~mirage.config.ParamSpec`, and scored by
``optuna.importance.get_param_importances`` with :class:`~optuna.importance.FanovaImportanceEvaluator`
(functional ANOVA on a random forest fitted to the trials, seeded; scikit-learn is a dependency).
It is chosen over Optuna's default, PED-ANOVA, which compares the top 10% of trials with all of
them: a sweep of a few dozen trials leaves it two or three top trials to estimate a density from,
while fANOVA uses every trial and picks up effects of any shape (a peak mid-range as well as a
trend). Importances are non-negative and sum to 1; when they cannot be computed every
parameter gets 0 and ``reason`` says why.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.importance import FanovaImportanceEvaluator, get_param_importances

from mirage.analysis import FigureHook, finish_figure
from mirage.config import ParamSpec

METHOD = "optuna.importance.FanovaImportanceEvaluator"
Observation = tuple[Mapping[str, Any], float | None]


@dataclass
class ParamImportance:
    """Importance of each searched parameter for the sweep's metric.

    ``importance`` maps every key of the space to a value in [0, 1] (summing to 1 unless all are
    0), ordered most important first; ``n_trials`` is the number of trials used; ``n_skipped``
    the trials left out (failed, no finite value, or a value outside the declared space);
    ``reason`` is set when the importances are all 0 because they could not be computed.
    """

    importance: dict[str, float]
    method: str
    n_trials: int
    n_skipped: int
    reason: str | None = None


# ----------------------------------------------------------------- distributions


def _choice(v: Any) -> Any:
    """A choice as Optuna stores it (None, bool, int, float or str); anything else by its repr."""
    v = v.item() if isinstance(v, np.generic) else v  # a value sampled by numpy (np.int64) is its Python twin
    return v if v is None or isinstance(v, (bool, int, float, str)) else repr(v)


def param_distribution(key: str, spec: ParamSpec) -> BaseDistribution:
    """One ``ParamSpec`` (bounds checked by the config) -> the Optuna distribution it samples from (int bounds inclusive)."""
    if spec.kind == "choice":
        return CategoricalDistribution([_choice(v) for v in spec.values])
    if spec.kind == "int":
        return IntDistribution(int(spec.low), int(spec.high))
    return FloatDistribution(spec.low, spec.high, log=spec.kind == "loguniform")


def _internal(dist: BaseDistribution, value: Any) -> Any:
    """A trial's value in the type its distribution holds, or ``None`` when it lies outside it."""
    try:
        if isinstance(dist, CategoricalDistribution):
            value = _choice(value)
            return value if value in dist.choices else None
        number = float(value)
    except (TypeError, ValueError):
        return None
    if isinstance(dist, IntDistribution):
        if not number.is_integer():
            return None
        return int(number) if dist.low <= number <= dist.high else None
    return number if dist.low <= number <= dist.high else None


# -------------------------------------------------------------------- importance


def parameter_importance(
    observations: Sequence[Observation], space: Mapping[str, ParamSpec], mode: str = "max", seed: int = 0
) -> ParamImportance:
    """fANOVA importance of each key of ``space`` for the trials' values.

    ``observations``: one ``(params, value)`` per trial, n_trials long. A trial is used when its
    value is finite and every key of ``space`` has a value inside its distribution; the others
    are counted in ``n_skipped``. ``mode`` ('max' | 'min') sets the study's direction; ``seed``
    fixes the random forest. Never raises on the trials: with fewer than 2 usable trials, or a
    constant value, every importance is 0 and ``reason`` says why.
    """
    dists = {k: param_distribution(k, s) for k, s in space.items()}
    zeros = {k: 0.0 for k in dists}
    used: list[tuple[dict[str, Any], float]] = []
    for params, value in observations:
        if value is None or not math.isfinite(value):
            continue
        row = {k: _internal(d, params.get(k)) for k, d in dists.items()}
        if all(v is not None for v in row.values()):
            used.append((row, float(value)))
    skipped = len(observations) - len(used)

    def empty(reason: str) -> ParamImportance:
        return ParamImportance(zeros, METHOD, len(used), skipped, reason)

    if not dists:
        return empty("the search space is empty")
    if len(used) < 2:
        return empty(f"needs at least 2 trials with a finite value inside the search space, got {len(used)}")
    values = np.array([v for _, v in used])  # (n_trials,)
    if np.ptp(values) == 0:
        return empty(f"every trial has the same value ({values[0]:g}): nothing to explain")
    if all(d.single() or len({row[k] for row, _ in used}) == 1 for k, d in dists.items()):
        return empty("no parameter takes two different values across the trials")

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "new study created" line per analysis
    try:
        study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
    finally:
        optuna.logging.set_verbosity(verbosity)
    for row, value in used:
        study.add_trial(optuna.trial.create_trial(params=row, distributions=dists, value=value))
    imp = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=seed), params=list(dists))
    return ParamImportance({k: float(v) for k, v in imp.items()}, METHOD, len(used), skipped)


# ------------------------------------------------------------------------ output


def write_analysis(
    observations: Sequence[Observation],
    space: Mapping[str, ParamSpec],
    *,
    name: str,
    metric: str,
    mode: str,
    seed: int,
    out: Path,
    on_figure: FigureHook | None = None,
) -> ParamImportance:
    """``objective.png`` (values in start order, best so far), ``importance.json`` and
    ``importance.png`` into ``out``; returns the importance. ``on_figure(name, fig)`` sees each
    plot (``name`` = its file stem) before it is closed."""
    out.mkdir(parents=True, exist_ok=True)
    imp = parameter_importance(observations, space, mode, seed)
    (out / "importance.json").write_text(json.dumps(asdict(imp), indent=2))
    values = np.array([np.nan if v is None else v for _, v in observations], dtype=float)  # (n_trials,)
    finish_figure(_plot_objective(values, name=name, metric=metric, mode=mode), out / "objective.png", on_figure)
    finish_figure(_plot_importance(imp, metric=metric), out / "importance.png", on_figure)
    return imp


def _pyplot():
    # matplotlib loads only when a figure is drawn, so the importance maths imports without it;
    # Agg draws to files without a display.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_objective(values: np.ndarray, *, name: str, metric: str, mode: str):
    """The objective figure; ``values``: (n_trials,) best metric per trial in start order, NaN where none."""
    plt = _pyplot()
    filled = np.where(np.isnan(values), -np.inf if mode == "max" else np.inf, values)
    running = np.maximum.accumulate(filled) if mode == "max" else np.minimum.accumulate(filled)
    running[~np.isfinite(running)] = np.nan
    x = np.arange(len(values))
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(x, values, "o", label="trial")
    ax.plot(x, running, "-", label=f"best so far ({mode})")
    ax.set(xlabel="trial (order started)", ylabel=metric, title=f"Sweep {name}: objective")
    ax.legend(fontsize=7)
    return fig


def _plot_importance(imp: ParamImportance, *, metric: str):
    """The importance figure: one bar per parameter, most important on top."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3))
    keys = list(imp.importance)[::-1]  # most important on top
    ax.barh(keys, [imp.importance[k] for k in keys])
    title = f"Parameter importance (fANOVA, {imp.n_trials} trials)"
    ax.set(xlabel=f"share of the variance of {metric}", title=title if imp.reason is None else f"{title}: {imp.reason}")
    ax.title.set_fontsize(8)
    return fig
