"""Experiment specs: every preset parses and builds valid trial configs; grids expand to methods x points x
seeds; a bad spec is refused with a message naming the key and what was expected."""

from __future__ import annotations

import pytest
import yaml

from mirage.config import ConfigError, load_config
from mirage.experiments.spec import ExperimentSpec, load_spec, parse_spec, spec_names

PRESETS = ("fig1a", "fig1b", "fig2c", "fig3", "example")


def test_every_figure_has_a_preset():
    assert set(PRESETS) <= set(spec_names())


@pytest.mark.parametrize("name", spec_names())
@pytest.mark.parametrize("preset", ["demo", "paper"])
def test_every_preset_builds_valid_trials(name, preset):
    cfg = load_config(preset)
    demo = preset == "demo"
    spec = load_spec(name, demo=demo)
    trials = spec.check(cfg)
    assert trials and len({t.key for t in trials}) == len(trials), "trial keys must be unique"
    assert len({t.run_name for t in trials}) == len(trials), "run names must be unique"
    assert spec.demo is None, "the demo block is applied or dropped, never left in a resolved spec"
    if demo:
        assert len(trials) <= len(load_spec(name).trials()), "the demo variant must not be larger than the spec"


def test_grid_expands_to_methods_points_and_seeds():
    spec = parse_spec({
        "name": "g",
        "base": {"train.epochs": 3},
        "methods": {"m": {"overrides": {"model.depth": 2}}, "lin": {"kind": "baseline", "baseline": "native_linear"}},
        "grid": {"model.n_queries": [2, 4, 8], "features.fusion": ["native", "posthoc"]},
        "seeds": [0, 1],
    })
    trials = spec.trials()
    model = [t for t in trials if t.kind == "model"]
    base = [t for t in trials if t.kind == "baseline"]
    assert len(model) == 3 * 2 * 2 and len(base) == 3 * 2  # a baseline has no seed
    t = model[0]
    assert t.overrides == {"train.epochs": 3, "model.n_queries": 2, "features.fusion": "native", "model.depth": 2,
                           "train.seed": 0}
    assert t.key == "m|n_queries=2,fusion=native|seed=0" and t.group == "m|n_queries=2,fusion=native"
    assert {tuple(sorted(t.point.items())) for t in model} == {
        (("features.fusion", f), ("model.n_queries", q)) for q in (2, 4, 8) for f in ("native", "posthoc")
    }
    assert all(t.seed is None and "train.seed" not in t.overrides for t in base)


def test_per_method_seeds_and_ensembles():
    spec = parse_spec({
        "name": "e", "seeds": [0],
        "methods": {"a": {}, "b": {"seeds": [0, 1, 2], "ensemble": True}},
        "grid": {"features.fusion": ["native", "posthoc"]},
    })
    assert sum(t.method == "b" for t in spec.trials()) == 6
    ens = spec.ensembles()
    assert [e.key for e in ens] == ["b+ensemble|fusion=native", "b+ensemble|fusion=posthoc"]
    assert all(len(e.members) == 3 for e in ens)


def test_demo_block_replaces_fields_and_merges_base():
    spec = parse_spec({
        "name": "d", "base": {"train.epochs": 10, "model.depth": 4}, "seeds": [0, 1, 2],
        "grid": {"model.n_queries": [8, 16]},
        "demo": {"base": {"train.epochs": 1}, "seeds": [0]},
    })
    demo = spec.variant(True)
    assert demo.base == {"train.epochs": 1, "model.depth": 4}
    assert demo.seeds == [0] and demo.grid == {"model.n_queries": [8, 16]}
    assert spec.variant(False).seeds == [0, 1, 2]
    assert demo.yielding_base(["train.epochs"]).base == {"model.depth": 4}, "a --set key replaces the spec's base"


@pytest.mark.parametrize(
    "tree, expected",
    [
        ({"name": "x", "grid": {"model.n_querys": [1]}}, "unknown config key 'model.n_querys'; did you mean 'model.n_queries'"),
        ({"name": "x", "grid": {"model.n_queries": []}}, "grid.model.n_queries is empty"),
        ({"name": "x", "seeds": []}, "seeds is empty"),
        ({"name": "x", "methods": {}}, "methods is empty"),
        ({"name": "x", "gird": {}}, "unknown key 'gird'"),
        ({"name": "x", "methods": {"m": {"overides": {}}}}, "unknown key 'methods.m.overides'"),
        ({"name": "x", "methods": {"m": {"kind": "baseline"}}}, "needs 'baseline: <name>'"),
        ({"name": "x", "grid": {"train.seed": [1, 2]}}, "list seeds under 'seeds'"),
        ({"name": "x", "splits": ["s08"]}, "splits.0"),
        ({"name": "x", "report": {"compare": ["a", "b"]}}, "report.compare names 'a'"),
        ({"name": "x", "grid": {"model.depth": [1]}, "methods": {"m": {"overrides": {"model.depth": 2}}}},
         "may not fix a grid key"),
        ({"name": "bad name"}, "name"),
    ],
)
def test_bad_spec_is_refused_with_a_clear_message(tree, expected):
    with pytest.raises(ConfigError) as e:
        parse_spec(tree, source="t.yaml")
    assert expected in str(e.value) and "t.yaml" in str(e.value)


def test_bad_value_is_refused_naming_the_trial():
    spec = parse_spec({"name": "v", "grid": {"model.depth": [2, 0]}})
    with pytest.raises(ConfigError, match=r"trial mirage\|depth=0\|seed=0: .*model.depth"):
        spec.check(load_config("demo"))


def test_a_yaml_path_loads_and_unknown_names_are_refused(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text(yaml.safe_dump({"name": "mine", "grid": {"model.depth": [1, 2]}}))
    spec = load_spec(str(p))
    assert isinstance(spec, ExperimentSpec) and len(spec.trials()) == 2
    with pytest.raises(ConfigError, match="unknown experiment 'fig2'.*did you mean"):
        load_spec("fig2")
    with pytest.raises(ConfigError, match="not found"):
        load_spec(str(tmp_path / "missing.yaml"))


# ---- report maths (core: from scores alone) -------------------------------------------------------


def _record(group, method, seed, r_val, subjects=("s1", "s2", "s3")):
    import numpy as np

    from mirage.experiments.report import TrialRecord
    from mirage.experiments.scoring import Scores

    sc = Scores(subjects=list(subjects), r={"val": np.asarray(r_val, np.float32)})
    return TrialRecord(f"run-{group}-{seed}", f"{group}|seed={seed}", group, method, "trial", {}, str(seed), sc)


def test_table_averages_seeds_then_gives_sem_over_subjects_and_normalised_r():
    import numpy as np

    from mirage.experiments.report import Context, experiment_table

    spec = parse_spec({"name": "t", "methods": {"a": {}}, "seeds": [0, 1]})
    # 3 subjects x 4 parcels; seed 1 is seed 0 + 0.2 on every parcel of every subject
    base = np.array([[0.1, 0.2, 0.3, 0.4], [0.0, 0.1, 0.2, 0.3], [0.2, 0.2, 0.2, 0.2]])
    recs = [_record("a", "a", 0, base), _record("a", "a", 1, base + 0.2)]
    ceiling = np.array([0.5, 0.5, 1.0, 0.05])  # the last parcel is below min_ceiling: no normalised r
    ctx = Context(subjects=["s1", "s2", "s3"], n_parcels=4, tr=1.49, ceiling=ceiling, min_ceiling=0.1)
    (row,) = experiment_table(spec, recs, ctx)
    subj = (base + 0.1).mean(axis=1)
    assert row["n_seeds"] == 2 and row["n_subjects"] == 3
    np.testing.assert_allclose(row["mean_r"], subj.mean(), rtol=1e-6)
    np.testing.assert_allclose(row["sem"], subj.std(ddof=1) / np.sqrt(3), rtol=1e-5)
    norm = ((base + 0.1)[:, :3] / ceiling[:3]).mean(axis=1)
    np.testing.assert_allclose(row["mean_r_norm"], norm.mean(), rtol=1e-5)
    np.testing.assert_allclose([row[f"r/s{i}"] for i in (1, 2, 3)], subj, rtol=1e-6)


def test_scores_round_trip_and_table_csv():
    import numpy as np

    from mirage.experiments.report import table_csv
    from mirage.experiments.scoring import Scores

    rng = np.random.default_rng(0)
    sc = Scores(subjects=["a", "b"], r={"val": rng.normal(size=(2, 5)).astype(np.float32)}, missing=["ood"],
                timecourses={"a": {"run": "s06e01a", "measured": rng.normal(size=(7, 5)), "predicted": rng.normal(size=(7, 5))}},
                probes={"input": rng.normal(size=(2, 5)).astype(np.float32)},
                attention={"text": rng.dirichlet(np.ones(3), size=(2, 4)).astype(np.float32)})
    back = Scores.from_bytes(sc.to_bytes())
    assert back.subjects == ["a", "b"] and back.missing == ["ood"] and back.timecourses["a"]["run"] == "s06e01a"
    np.testing.assert_array_equal(back.r["val"], sc.r["val"])
    np.testing.assert_array_equal(back.probes["input"], sc.probes["input"])
    np.testing.assert_array_equal(back.attention["text"], sc.attention["text"])
    np.testing.assert_allclose(back.timecourses["a"]["measured"], sc.timecourses["a"]["measured"], atol=1e-2)  # float16
    assert set(sc.summary()) == {"r_val", "r_val/a", "r_val/b", "probe_input"}
    text = table_csv([{"row": "x", "mean_r": 0.5}, {"row": "y", "mean_r": 0.25, "sem": 0.1}])
    assert text.splitlines() == ["row,mean_r,sem", "x,0.5,", "y,0.25,0.1"]


def test_experiment_r_is_the_official_score_per_parcel():
    """Two OOD movies are two groups: the per-parcel r averages them, and its mean over parcels is
    the subject's official score (not the r of both movies concatenated)."""
    import numpy as np

    from mirage.data.run_key import RunKey
    from mirage.experiments.scoring import official_r
    from mirage.metrics import EDGE_TRS, algonauts_score, concat_trimmed, pearson_r

    rng = np.random.default_rng(0)
    keys = [RunKey("sub-01", s) for s in ("chaplin1", "chaplin2", "pulpfiction1")] + [RunKey("sub-02", "chaplin1")]
    targets = {k: rng.normal(size=(40, 6)) for k in keys}
    preds = {k: t + rng.normal(scale=1.0 + i, size=t.shape) for i, (k, t) in enumerate(targets.items())}
    r = official_r(preds, targets, ["sub-01", "sub-02", "sub-03"], 6)
    nested = [{s: {k.name: a[k] for k in keys if k.subject == s} for s in ("sub-01", "sub-02")} for a in (preds, targets)]
    official = algonauts_score(*nested)
    assert np.allclose(np.nanmean(r, axis=1)[:2], [official.subjects["sub-01"], official.subjects["sub-02"]])
    assert np.isnan(r[2]).all()  # no run
    pooled = pearson_r(concat_trimmed([preds[k] for k in keys[:3]], EDGE_TRS),
                       concat_trimmed([targets[k] for k in keys[:3]], EDGE_TRS))
    assert abs(float(pooled.mean()) - official.subjects["sub-01"]) > 1e-3  # the rule the groups change
