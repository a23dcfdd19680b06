"""A declared experiment end to end: inputs, the Tune grid, seed ensembles, then the report.

:func:`run_experiment` makes sure the dataset and every feature store the trials read exist
(:func:`mirage.pipeline.inputs.ensure_inputs`, once per distinct ``features`` setting), opens (or
reopens) the experiment's MLflow parent run, logs the report's context there (the resolved spec,
subjects, TR, noise ceiling, atlas), runs the pending trials as one Ray Tune grid search
(:func:`mirage.distributed.experiment.run_grid`), scores each seed ensemble (the equal-weight mean
of a method's seed models at one grid point, an ``ensemble`` child run), and writes the report.

:func:`write_report` computes the table and figures from the parent run's children in MLflow
alone (``mirage experiment report NAME``): the table as ``experiment/table.csv`` and an MLflow table
(``experiment/table.json``) on the parent, each row's numbers as metrics on the row's child runs
and on the parent (``<row>/table/<split>/mean_r``), the figures with ``log_figure`` under
``figures/<figure>/``.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mirage import tracking
from mirage.config import Config
from mirage.distributed.cluster import init_ray, ray_session
from mirage.distributed.experiment import (
    EXPERIMENT_TAG,
    GROUP_TAG,
    GRID_TAG,
    HASH_TAG,
    METHOD_TAG,
    SCORED_TAG,
    SCORES_DIR,
    SCORES_FILE,
    SEED_TAG,
    TRIAL_KEY_TAG,
    GridResult,
    find_parent,
    log_scores,
    open_parent,
    pending_trials,
    run_grid,
)
from mirage.distributed.train import best_export_dir
from mirage.errors import MirageError
from mirage.experiments.report import (
    Context,
    Report,
    TrialRecord,
    experiment_figures,
    experiment_table,
    metric_name,
    row_metrics,
    table_csv,
)
from mirage.experiments.scoring import Scores, score_models
from mirage.experiments.spec import SEED_KEY, ExperimentSpec, format_value, parse_spec
from mirage.pipeline.inputs import ensure_inputs
from mirage.train.loop import MODEL_DIR

CONTEXT_DIR = "experiment/context"
SPEC_FILE = "spec.json"
CONTEXT_FILE = "context.json"
CEILING_FILE = "ceiling.npy"
ATLAS_FILE = "atlas.nii.gz"


@dataclass
class ExperimentOutcome:
    """A run experiment: its grid run, the seed ensembles scored and its report."""

    name: str
    parent_run_id: str
    grid: GridResult
    ensembles: list[str] = field(default_factory=list)
    report: Report | None = None


# ------------------------------------------------------------------ running


def run_experiment(cfg: Config, spec: ExperimentSpec) -> ExperimentOutcome:
    """Run (or resume) ``spec`` over ``cfg`` and write its report; trials already done are skipped.

    Raises:
        ConfigError: a trial's overrides do not make a valid config (before anything runs).
        MirageError: some trial failed (the others are kept; rerunning retries the failed ones).
        KeyboardInterrupt: the grid was stopped (Ctrl-C) before every trial finished; rerunning resumes it.
    """
    trials = spec.check(cfg)
    with ray_session(cfg.ray, start=False):
        seen: set[str] = set()
        for t in trials:
            tcfg = cfg.with_overrides(t.overrides)
            key = json.dumps(tcfg.features.model_dump(mode="json"), sort_keys=True) + tcfg.data.root
            if key not in seen:
                seen.add(key)
                ensure_inputs(tcfg)
        parent, _ = open_parent(cfg, spec)
        status = "FAILED"
        try:
            log_context(cfg, spec, parent)
            if pending_trials(cfg, trials, parent):
                init_ray(cfg.ray)
            grid = run_grid(cfg, spec, parent, trials)
            if grid.interrupted:
                raise KeyboardInterrupt(f"experiment {spec.name!r}: {len(grid.interrupted)} trials cut off")
            ensembles = run_ensembles(cfg, spec, parent)
            if grid.failed:
                lines = "; ".join(f"{k}: {v}" for k, v in grid.failed.items())
                raise MirageError(
                    f"experiment {spec.name!r}: {len(grid.failed)} of {len(trials)} trials failed ({lines}); "
                    "rerun the same command to retry them (finished trials are kept)"
                )
            out = ExperimentOutcome(spec.name, parent, grid, ensembles)
            out.report = write_report(cfg, spec.name)
            status = "FINISHED"
            return out
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            tracking.end_run(cfg.tracking.uri, parent, status)


def log_context(cfg: Config, spec: ExperimentSpec, parent: str) -> None:
    """The spec and what the report needs beyond scores (subjects, TR, ceiling, atlas) on the parent run."""
    from mirage.brain.atlas import atlas_path, find_atlas
    from mirage.brain.ceiling import load_ceiling

    ceiling = load_ceiling(cfg.data.root, cfg.data.n_parcels, path=cfg.data.noise_ceiling)
    ctx = {"subjects": list(cfg.data.subjects), "n_parcels": cfg.data.n_parcels, "tr": cfg.data.tr,
           "ceiling_source": ceiling.source if ceiling is not None else "", "min_ceiling": cfg.data.noise_ceiling_min}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        (d / SPEC_FILE).write_text(json.dumps(spec.model_dump(mode="json"), indent=2))
        (d / CONTEXT_FILE).write_text(json.dumps(ctx, indent=2))
        if ceiling is not None:
            np.save(d / CEILING_FILE, ceiling.values)
        if find_atlas(cfg.data.root, cfg.data.n_parcels, list(cfg.data.subjects)) is not None:
            for s in cfg.data.subjects:
                p = atlas_path(cfg.data.root, s)
                if p.is_file():
                    (d / ATLAS_FILE).write_bytes(p.read_bytes())
                    break
        tracking.log_artifacts(cfg.tracking.uri, parent, d, CONTEXT_DIR)
    tracking.set_tags(cfg.tracking.uri, parent, {"mirage.splits": ",".join(spec.splits),
                                                 "mirage.noise_ceiling": ctx["ceiling_source"] or "none"})


def _finished_runs(cfg: Config, parent: str) -> dict[str, Any]:
    """Trial key -> its latest FINISHED, scored child run."""
    out = {}
    for run in tracking.child_runs(cfg.tracking, parent):
        tags = run.data.tags
        if run.info.status == "FINISHED" and tags.get(SCORED_TAG) == "1" and TRIAL_KEY_TAG in tags:
            out[tags[TRIAL_KEY_TAG]] = run
    return out


def run_ensembles(cfg: Config, spec: ExperimentSpec, parent: str) -> list[str]:
    """Score every seed ensemble not scored yet (same members) as an ``ensemble`` child run; returns their keys.

    Members are the trials' exported best models in their Train folders (``train.storage``).
    """
    from mirage.features.store import open_store
    from mirage.predictor import Predictor

    plans = spec.ensembles()
    if not plans:
        return []
    runs = _finished_runs(cfg, parent)
    done = []
    for plan in plans:
        member_ids = sorted(runs[m.key].info.run_id for m in plan.members if m.key in runs)
        if len(member_ids) < len(plan.members):
            continue  # a member failed: no ensemble of this point
        prev = runs.get(plan.key)
        if prev is not None and prev.data.tags.get(HASH_TAG) == ",".join(member_ids):
            continue
        ecfg = cfg.with_overrides({k: v for k, v in plan.members[0].overrides.items() if k != SEED_KEY})
        dirs = []
        for m in plan.members:
            best = best_export_dir(Path(cfg.train.storage) / m.run_name)
            if best is None:
                raise MirageError(f"ensemble {plan.key}: member {m.key} has no exported model under "
                                  f"{Path(cfg.train.storage) / m.run_name}")
            dirs.append(best / MODEL_DIR)
        predictors = [Predictor.from_path(d, window_batch=cfg.serve.window_batch) for d in dirs]
        tags = {EXPERIMENT_TAG: spec.name, TRIAL_KEY_TAG: plan.key, GROUP_TAG: plan.group,
                METHOD_TAG: f"{plan.method}+ensemble", SEED_TAG: "", HASH_TAG: ",".join(member_ids),
                "mirage.ensemble_rule": "equal-weight mean of the seed models' predictions",
                "mirage.ensemble_members": ",".join(member_ids),
                **{GRID_TAG + k: format_value(v) for k, v in plan.point.items()}}
        with tracking.tracked_run(ecfg, "ensemble", plan.run_name, parent_run_id=parent, tags=tags) as run_id:
            scores = score_models(ecfg, predictors, open_store(ecfg.features), list(spec.splits))
            log_scores(cfg.tracking.uri, run_id, scores)
        done.append(plan.key)
    return done


# ------------------------------------------------------------------ reporting


def _download(cfg: Config, run_id: str, path: str, dest: Path) -> Path | None:
    return tracking.download_run_artifacts(cfg.tracking.uri, run_id, path, dest)


def load_records(cfg: Config, parent: str, dest: Path) -> list[TrialRecord]:
    """Every scored child run of the parent as a :class:`TrialRecord` (the latest run of each trial key)."""
    out = []
    for i, (key, run) in enumerate(_finished_runs(cfg, parent).items()):
        f = _download(cfg, run.info.run_id, f"{SCORES_DIR}/{SCORES_FILE}", dest / f"r{i}")
        if f is None:
            continue
        tags = run.data.tags
        point = {k[len(GRID_TAG):]: v for k, v in tags.items() if k.startswith(GRID_TAG)}
        out.append(TrialRecord(
            run_id=run.info.run_id, key=key, group=tags.get(GROUP_TAG, key), method=tags.get(METHOD_TAG, ""),
            kind=tags.get("mirage.kind", ""), point=point, seed=tags.get(SEED_TAG, ""),
            scores=Scores.from_bytes(f.read_bytes()),
        ))
    return out


def load_context(cfg: Config, parent: str, dest: Path) -> tuple[ExperimentSpec, Context]:
    """The spec and report context logged on the parent run."""
    folder = _download(cfg, parent, CONTEXT_DIR, dest)
    if folder is None or not (folder / SPEC_FILE).is_file():
        raise MirageError(f"experiment run {parent}: no {CONTEXT_DIR}/{SPEC_FILE}; rerun `mirage experiment run`")
    spec = parse_spec(json.loads((folder / SPEC_FILE).read_text()), source=f"run {parent}")
    raw = json.loads((folder / CONTEXT_FILE).read_text())
    ctx = Context(subjects=raw["subjects"], n_parcels=int(raw["n_parcels"]), tr=float(raw["tr"]),
                  ceiling_source=raw.get("ceiling_source", ""), min_ceiling=float(raw.get("min_ceiling", 0.1)))
    if (folder / CEILING_FILE).is_file():
        ctx.ceiling = np.load(folder / CEILING_FILE)
    if (folder / ATLAS_FILE).is_file():
        import nibabel as nib

        ctx.atlas = nib.load(str(folder / ATLAS_FILE))
        ctx.atlas = nib.Nifti1Image(np.asanyarray(ctx.atlas.dataobj), ctx.atlas.affine, ctx.atlas.header)
    return spec, ctx


def _order(spec: ExperimentSpec, records: list[TrialRecord]) -> list[TrialRecord]:
    """Records in the spec's trial order (ensembles after their method's trials); others dropped."""
    order = {t.key: i for i, t in enumerate(spec.trials())}
    for j, e in enumerate(spec.ensembles()):
        order[e.key] = len(order) + j
    return sorted((r for r in records if r.key in order), key=lambda r: order[r.key])


def log_table(cfg: Config, run_id: str, rows: list[dict[str, Any]], artifact_file: str) -> None:
    """``rows`` as an MLflow table artifact, replacing an earlier one (MLflow's ``log_table`` appends to it)."""
    import pandas as pd

    cols = list(dict.fromkeys(k for r in rows for k in r))
    df = pd.DataFrame({k: [r.get(k) for r in rows] for k in cols})
    c = tracking.client(cfg.tracking.uri)
    folder, _, fname = artifact_file.rpartition("/")
    if artifact_file not in {f.path for f in c.list_artifacts(run_id, folder or None)}:
        c.log_table(run_id, df, artifact_file)  # first time: MLflow also tags the run as holding a table
        return
    with tempfile.TemporaryDirectory() as d:
        df.to_json(Path(d) / fname, orient="split", index=False, date_format="iso")
        tracking.log_artifacts(cfg.tracking.uri, run_id, Path(d) / fname, folder or None)


def write_report(cfg: Config, name: str) -> Report:
    """The experiment's table and figures from its latest parent run's children in MLflow, logged back there.

    Raises:
        MirageError: no experiment ``name`` in the tracking store, or no scored trial under it.
    """
    parent_run = find_parent(cfg, name)
    if parent_run is None:
        raise MirageError(f"no experiment {name!r} in MLflow at {cfg.tracking.uri} "
                          f"(experiment {cfg.tracking.experiment!r}): run `mirage experiment run {name}` first")
    parent = parent_run.info.run_id
    uri = cfg.tracking.uri
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        spec, ctx = load_context(cfg, parent, d / "context")
        records = _order(spec, load_records(cfg, parent, d / "runs"))
        if not records:
            raise MirageError(f"experiment {name!r} (run {parent}): no scored trial yet; run `mirage experiment run {name}`")
        rows = experiment_table(spec, records, ctx)
        report = experiment_figures(spec, records, rows, ctx)
        (d / "table.csv").write_text(table_csv(rows))
        tracking.log_artifacts(uri, parent, d / "table.csv", "experiment")
        for fname, extra in (("networks.csv", report.network_rows), ("probes.csv", report.probe_rows),
                             ("attention.csv", report.attention_rows)):
            if extra:
                (d / fname).write_text(table_csv(extra))
                tracking.log_artifacts(uri, parent, d / fname, "experiment")
    c = tracking.client(uri)
    log_table(cfg, parent, rows, "experiment/table.json")
    per_row = row_metrics(rows)
    for rec in records:
        tracking.log_metrics(uri, rec.run_id, per_row.get(rec.group, {}), step=0)
    tracking.log_metrics(uri, parent, {f"{metric_name(g)}/{k}": v for g, m in per_row.items() for k, v in m.items()}, step=0)
    import matplotlib.pyplot as plt

    for path, fig in report.figures.items():
        c.log_figure(parent, fig, f"figures/{path}.png")
        plt.close(fig)
    if report.notes:
        tracking.set_tags(uri, parent, {"mirage.report_notes": "; ".join(report.notes)})
    return report
