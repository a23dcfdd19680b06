"""Sweep analysis: Optuna fANOVA parameter importance on synthetic trials, its edge cases, figures."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from mirage.config import ParamSpec
from mirage.sweep_analysis import (
    param_distribution,
    parameter_importance,
    write_analysis,
)
from optuna.distributions import (
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from pydantic import ValidationError
from scipy.stats import spearmanr

SPACE = {
    "train.lr": ParamSpec(kind="loguniform", low=1e-4, high=1e-2),
    "model.pooler_dropout": ParamSpec(kind="float", low=0.0, high=0.5),
    "model.depth": ParamSpec(kind="int", low=1, high=6),
    "model.n_queries": ParamSpec(kind="choice", values=[8, 16, 32]),
}


def synthetic(n: int, objective, seed: int = 0) -> list[tuple[dict, float]]:
    """n trials sampled uniformly from SPACE; ``objective(params, rng)`` gives each trial's value."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p = {
            "train.lr": float(10 ** rng.uniform(-4, -2)),
            "model.pooler_dropout": float(rng.uniform(0, 0.5)),
            "model.depth": int(rng.integers(1, 7)),
            "model.n_queries": int(rng.choice([8, 16, 32])),
        }
        out.append((p, float(objective(p, rng))))
    return out


@pytest.mark.parametrize("mode", ["max", "min"])
@pytest.mark.parametrize("driver", ["model.pooler_dropout", "model.depth"])
def test_the_parameter_that_drives_the_objective_ranks_first(driver, mode):
    trials = synthetic(40, lambda p, rng: p[driver] / (SPACE[driver].high or 1) + 0.02 * rng.normal())
    imp = parameter_importance(trials, SPACE, mode)
    assert imp.reason is None and imp.n_trials == 40 and imp.n_skipped == 0
    assert set(imp.importance) == set(SPACE)
    assert max(imp.importance, key=imp.importance.get) == driver
    assert imp.importance[driver] > 0.5
    assert math.isclose(sum(imp.importance.values()), 1.0)
    assert parameter_importance(trials, SPACE, mode).importance == imp.importance  # seeded: reproducible


def test_a_non_monotonic_driver_is_found_where_rank_correlation_sees_none():
    # the objective peaks mid-range and every dropout is mirrored about the peak, so |Spearman rho|
    # of the driver is near 0; fANOVA still finds it
    half = synthetic(30, lambda p, rng: 0.0, seed=1)
    half += [({**p, "model.pooler_dropout": 0.5 - p["model.pooler_dropout"]}, 0.0) for p, _ in half]
    rng = np.random.default_rng(2)
    trials = [(p, -((p["model.pooler_dropout"] - 0.25) ** 2) + 1e-5 * rng.normal()) for p, _ in half]
    x = [p["model.pooler_dropout"] for p, _ in trials]
    assert abs(spearmanr(x, [v for _, v in trials]).statistic) < 0.1
    imp = parameter_importance(trials, SPACE)
    assert max(imp.importance, key=imp.importance.get) == "model.pooler_dropout"


def test_a_categorical_driver_is_found():
    trials = synthetic(40, lambda p, rng: {8: 0.1, 16: 0.5, 32: 0.2}[p["model.n_queries"]] + 0.01 * rng.normal())
    imp = parameter_importance(trials, SPACE)
    assert max(imp.importance, key=imp.importance.get) == "model.n_queries"


@pytest.mark.parametrize("n", [0, 1])
def test_fewer_than_two_trials_give_zero_importance_and_a_reason(n):
    imp = parameter_importance(synthetic(n, lambda p, rng: 0.5), SPACE)
    assert imp.importance == {k: 0.0 for k in SPACE}
    assert imp.n_trials == n and "at least 2 trials" in imp.reason


def test_failed_and_out_of_space_trials_are_skipped_and_counted():
    trials = synthetic(20, lambda p, rng: p["model.depth"] + 0.05 * rng.normal())
    bad = [
        ({**trials[0][0]}, None),  # failed
        ({**trials[1][0]}, float("nan")),  # no finite value
        ({**trials[2][0], "model.depth": 99}, 1.0),  # outside the declared space
        ({k: v for k, v in trials[3][0].items() if k != "train.lr"}, 1.0),  # parameter missing
        ({**trials[4][0], "model.depth": 2.5}, 1.0),  # not an integer
    ]
    # values as numpy samples them (np.int64) count like their Python twins
    numpy_typed = [({**p, "model.n_queries": np.int64(p["model.n_queries"]), "model.depth": np.int64(p["model.depth"])}, v)
                   for p, v in trials[5:]]
    imp = parameter_importance(trials[:5] + numpy_typed + bad, SPACE)
    assert (imp.n_trials, imp.n_skipped) == (20, 5)
    assert max(imp.importance, key=imp.importance.get) == "model.depth"
    only_failed = parameter_importance([(p, None) for p, _ in trials], SPACE)
    assert only_failed.n_skipped == 20 and all(v == 0.0 for v in only_failed.importance.values())
    assert "got 0" in only_failed.reason


def test_constant_objective_gives_zero_importance_and_a_reason():
    imp = parameter_importance(synthetic(10, lambda p, rng: 0.3), SPACE)
    assert all(v == 0.0 for v in imp.importance.values()) and "same value" in imp.reason


def test_a_parameter_with_a_single_value_gets_zero():
    trials = synthetic(30, lambda p, rng: p["model.depth"] + 0.05 * rng.normal())
    for p, _ in trials:
        p["model.n_queries"] = 16  # never varied
    space = {**SPACE, "model.fixed": ParamSpec(kind="choice", values=["a"])}
    trials = [({**p, "model.fixed": "a"}, v) for p, v in trials]
    imp = parameter_importance(trials, space)
    assert imp.importance["model.n_queries"] == 0.0 and imp.importance["model.fixed"] == 0.0
    assert max(imp.importance, key=imp.importance.get) == "model.depth"
    nothing_varies = [({k: SPACE[k].low if SPACE[k].low is not None else 8 for k in SPACE}, v) for v in (0.1, 0.2)]
    imp = parameter_importance(nothing_varies, SPACE)
    assert all(v == 0.0 for v in imp.importance.values()) and "two different values" in imp.reason


def test_each_param_kind_maps_to_its_optuna_distribution():
    assert param_distribution("a", SPACE["model.depth"]) == IntDistribution(1, 6)  # inclusive, unlike tune.randint
    assert param_distribution("a", SPACE["train.lr"]) == FloatDistribution(1e-4, 1e-2, log=True)
    assert param_distribution("a", SPACE["model.pooler_dropout"]) == FloatDistribution(0.0, 0.5)
    assert param_distribution("a", SPACE["model.n_queries"]) == CategoricalDistribution([8, 16, 32])
    for bad, message in [
        ({"kind": "int", "low": 3, "high": 1}, "low <= high"),
        ({"kind": "loguniform", "low": 0, "high": 1}, "low > 0"),
        ({"kind": "choice", "values": []}, "non-empty"),
    ]:  # a spec that could not be sampled never gets built
        with pytest.raises(ValidationError, match=message):
            ParamSpec(**bad)


def test_write_analysis_writes_the_importance_and_figures(tmp_path):
    trials = synthetic(13, lambda p, rng: p["model.depth"] + 0.05 * rng.normal())
    trials[-1] = (trials[-1][0], None)  # failed
    seen = []
    imp = write_analysis(trials, SPACE, name="s", metric="val_r", mode="max", seed=0, out=tmp_path / "a",
                         on_figure=lambda name, fig: seen.append((name, len(fig.axes))))
    assert seen == [("objective", 1), ("importance", 1)]
    saved = json.loads((tmp_path / "a" / "importance.json").read_text())
    assert saved["importance"] == imp.importance and saved["n_trials"] == 12 and saved["n_skipped"] == 1
    for png in ("objective.png", "importance.png"):
        assert (tmp_path / "a" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_analysis_imports_without_ray_or_mlflow():
    code = "import sys; sys.modules.update(ray=None, mlflow=None); import mirage.sweep_analysis"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
