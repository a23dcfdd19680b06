"""Ensemble stage: train the members with Ray Train, weight them, log and register one model.

Members are the sweep's ``ensemble.top_k`` best configs times seeds (``ensemble.n_members``
in all). A member whose config and seed equal a trial that ran every epoch is that trial's
model (downloaded from its MLflow run), not a retraining.

Scores are cross-fitted (:func:`mirage.ensemble.cross_fit`) over two folds of the validation
runs, from every epoch's validation predictions that training logged
(``val_predictions/epoch_NNNN.npz`` of each member's and each trial's MLflow run): on one fold
each candidate's epoch, the top-k configs and the weights are chosen, on the other the ensemble,
the best member and the mean member are scored; then the folds swap. The weights shipped in
the ensemble directory (submissions, the registered model) are refit on every validation run
from the exported members. The ensemble run (``mirage.kind=ensemble``) names its members' run
ids and the weighting rule, holds the weights, the cross-fitted metrics per fold and overall,
the interpretability artifacts of the best member, and the ensemble directory as one pyfunc
model registered under ``ensemble.registry_name``. The alias ``ensemble.alias`` moves to the new
version only when its held-out score (the cross-fitted ``ensemble_r``) is at least the current
holder's, or with ``ensemble.promote``; the run's ``mirage.champion_*`` tags record the decision.
The ensemble directory is built in a unique temporary folder and swapped into place.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mirage import tracking
from mirage.analysis import AnalysisResult, analyze, write_analysis
from mirage.config import MODALITIES, Config
from mirage.data.fmri import load_fmri, zscore
from mirage.data.run_key import RunKey, nest
from mirage.distributed.sweep import SWEEP_TAG, SweepResult
from mirage.distributed.train import run_training
from mirage.ensemble import (
    WEIGHTING_RULE,
    Candidate,
    CrossFit,
    MemberSpec,
    choose_members,
    cross_fit,
    refit_weights,
    two_folds,
)
from mirage.errors import MirageError, ModelLoadError
from mirage.features.store import FeatureStore, open_store
from mirage.model_dirs import find_model_dir
from mirage.predictor import Predictor, predict_stored, stored_runs
from mirage.submission import read_predictions
from mirage.tracking.predictions import epoch_predictions
from mirage.valpred import validation_keys

WEIGHTS_FIT_ON = "all validation runs"
HELDOUT_METRIC = "ensemble_r"
"""The ensemble's held-out score: cross-fitted, each fold scored by choices made on the other."""


@dataclass
class TrainedMember:
    """A trained ensemble member: its spec, its MLflow run and its exported model directory."""

    spec: MemberSpec
    run_id: str | None
    model_dir: str
    reused_trial: str | None = None


@dataclass
class EnsembleOutcome:
    """What the ensemble stage produced."""

    run_id: str
    directory: str
    model_uri: str
    version: str
    members: list[TrainedMember]
    fit: CrossFit
    metrics: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0
    champion: Any = None  # mirage.tracking.ChampionDecision


# -------------------------------------------------------------- validation data


def validation_runs(cfg: Config) -> dict[RunKey, Any]:
    """RunKey -> FmriRun of every validation run, in release order.

    Run names (``RunKey.name``) are those of the per-epoch predictions of
    :func:`mirage.valpred.predict_validation`.
    """
    out = dict(validation_keys(cfg))
    if not out:
        raise MirageError(f"no validation fMRI under {cfg.data.root} for data.val={cfg.data.val}")
    return out


def validation_targets(cfg: Config, runs: dict[RunKey, Any]) -> dict[str, dict[str, np.ndarray]]:
    """subject -> run name -> (n_trs, n_parcels) fMRI, z-scored per run when ``data.zscore``."""
    return nest({
        k: (zscore(load_fmri(r.path, r.key)) if cfg.data.zscore else load_fmri(r.path, r.key)) for k, r in runs.items()
    })


def member_predictions(predictor: Predictor, store: FeatureStore, runs: dict[RunKey, Any],
                       targets: dict[str, dict[str, np.ndarray]]) -> list[dict[str, dict[str, np.ndarray]]]:
    """Every member's predictions of the validation runs, one forward pass per window for all members.

    Returns:
        per member: subject -> run name -> (n_trs, n_parcels), n_trs as in ``targets``.
    """
    lengths = {k: len(targets[k.subject][k.name]) for k in runs}
    stacked = predict_stored(predictor, store, lengths, per_member=True)  # RunKey -> (M, T, P)
    return [nest({k: v[i] for k, v in stacked.items()}) for i in range(len(predictor.members))]


# ------------------------------------------------------------------- members


def member_name(cfg: Config, spec: MemberSpec) -> str:
    """Train run name of a member: derived from its overrides and seed (rerunning reuses it)."""
    key = json.dumps({"o": spec.overrides, "s": spec.seed, "sweep": cfg.sweep.name}, sort_keys=True, default=str)
    return f"{cfg.sweep.name}-member-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def _reusable_trials(cfg: Config, sweep: SweepResult) -> dict[str, Any]:
    """Trials that ran every epoch and finished, keyed by trial id."""
    return {
        t.trial_id: t
        for t in sweep.trials
        if t.status == "TERMINATED" and not t.stopped_early and t.epochs >= cfg.train.epochs and t.run_id
    }


def _download_model(cfg: Config, run_id: str, dest: Path) -> str | None:
    """The exported model of a run, downloaded; None when the run has none (the member is trained instead)."""
    path = tracking.download_run_artifacts(cfg.tracking.uri, run_id, "model", dest)
    if path is None:
        return None
    try:  # the run's MLflow model holds the exported directory (artifacts/predictor); older runs hold it as is
        found = find_model_dir(path)
    except ModelLoadError:
        return None
    return str(found) if (found / "model.safetensors").is_file() else None


def train_members(
    cfg: Config, specs: list[MemberSpec], sweep: SweepResult, parent_run_id: str, work: Path
) -> list[TrainedMember]:
    """Train (or reuse) every member; each new one is a ``train`` run nested under the ensemble run."""
    reusable = _reusable_trials(cfg, sweep)
    out = []
    for spec in specs:
        trial = reusable.get(spec.source)
        if trial is not None and spec.seed == cfg.train.seed:
            path = _download_model(cfg, trial.run_id, work / f"trial-{trial.trial_id}")
            if path:
                tracking.set_tags(cfg.tracking.uri, trial.run_id, {"mirage.ensemble_member_of": parent_run_id})
                out.append(TrainedMember(spec, trial.run_id, path, reused_trial=trial.trial_id))
                continue
        mcfg = cfg.with_overrides({**spec.overrides, "train.seed": spec.seed})
        res = run_training(
            mcfg,
            tracking_parent=parent_run_id,
            name=member_name(cfg, spec),
            tags={"mirage.ensemble_member": str(spec.index), "mirage.source_trial": spec.source},
            kind="train",
        )
        if not res.model_dir:
            raise MirageError(f"ensemble member {spec.index} ({res.name}) produced no exported model under {res.path}")
        out.append(TrainedMember(spec, res.mlflow_run_id, res.model_dir))
    return out


# --------------------------------------------------------------------- driver


def _config_id(overrides: dict[str, Any]) -> str:
    return json.dumps(overrides, sort_keys=True, default=str)


def candidates(cfg: Config, sweep: SweepResult, members: list[TrainedMember], exported: list[dict], dest: Path):
    """The models that may join a cross-fitted ensemble, and how to load their epochs' predictions.

    Every member, then every other sweep trial with logged per-epoch validation predictions (a
    config the sweep ranked lower may still rank in the top k of a fold). A member without
    per-epoch predictions enters with its exported model's predictions as its only epoch.

    Returns:
        (candidates, load(candidate index, epoch) -> predictions, names of members without per-epoch predictions).
    """
    cands: list[Candidate] = []
    loaders: list[Any] = []
    without: list[str] = []
    seen: set[str] = set()
    for m, preds in zip(members, exported):
        name = f"member-{m.spec.index}"
        files = epoch_predictions(cfg.tracking.uri, m.run_id, dest / name) if m.run_id not in seen else {}
        if files:
            cands.append(Candidate(name, _config_id(m.spec.overrides), tuple(sorted(files))))
            loaders.append(lambda e, f=files: read_predictions(f[e]))
        else:
            without.append(name)
            cands.append(Candidate(name, _config_id(m.spec.overrides), (0,)))
            loaders.append(lambda e, p=preds: p)
        seen.add(m.run_id or name)
    for t in sweep.trials:
        if not t.run_id or t.run_id in seen:
            continue
        files = epoch_predictions(cfg.tracking.uri, t.run_id, dest / f"trial-{t.trial_id}")
        if files:
            cands.append(Candidate(f"trial-{t.trial_id}", _config_id(t.params), tuple(sorted(files))))
            loaders.append(lambda e, f=files: read_predictions(f[e]))
            seen.add(t.run_id)
    return cands, (lambda i, e: loaders[i](e)), without


def crossfit_record(cross: CrossFit) -> dict[str, Any]:
    """What each fold chose and scored (``crossfit.json``)."""
    return {
        "temperature": cross.temperature,
        "candidates": [{"name": c.name, "config": c.config, "epochs": list(c.epochs)} for c in cross.candidates],
        "folds": [
            {
                "fit_runs": f.fit_runs, "score_runs": f.score_runs, "configs": f.configs,
                "members": [cross.candidates[i].name for i in f.members], "epochs": f.epochs,
                "best_member": cross.candidates[f.members[f.best]].name,
                "ensemble_r": f.ensemble_r, "best_member_r": f.best_member_r, "mean_member_r": f.mean_member_r,
                "weight_entropy": f.entropy, "max_entropy": float(np.log(len(f.members))),
                "member_corr": f.member_corr,
            }
            for f in cross.folds
        ],
        "summary": cross.summary(),
    }


def build_ensemble(cfg: Config, sweep: SweepResult) -> EnsembleOutcome:
    """Members -> cross-fitted scores (two folds) -> weights refit on all runs -> directory -> MLflow run + registry.

    The members predict through one :class:`Predictor` built from their exported directories; the
    weights refit from those predictions are set on that same predictor, which writes the
    ensemble directory that is registered.
    """
    t0 = time.time()
    ranked = sweep.ranked()
    specs = choose_members(
        [t.params for t in ranked], cfg.ensemble.top_k, cfg.ensemble.n_members, cfg.train.seed,
        sources=[t.trial_id for t in ranked],
    )
    name = f"{cfg.sweep.name}-ensemble"
    run_id = tracking.start_run(
        cfg, "ensemble", name, tags={SWEEP_TAG: cfg.sweep.name, "mirage.sweep_run": sweep.parent_run_id,
                                     "mirage.weighting": WEIGHTING_RULE, "mirage.weights_fit_on": WEIGHTS_FIT_ON},
    )
    uri = cfg.tracking.uri
    try:
        with tempfile.TemporaryDirectory(prefix="mirage-ensemble-") as tmp:
            work = Path(tmp)
            members = train_members(cfg, specs, sweep, run_id, work)
            store = open_store(cfg.features)
            runs = validation_runs(cfg)
            targets = validation_targets(cfg, runs)
            subjects = [s for s in cfg.data.subjects if s in targets]
            predictor = Predictor.from_members([m.model_dir for m in members], window_batch=cfg.serve.window_batch)
            if subjects != predictor.subjects:
                raise MirageError(
                    f"ensemble: validation runs cover subjects {subjects}, the members predict {predictor.subjects}; "
                    "expected the same subjects (data.subjects and data.val)"
                )
            per_member = member_predictions(predictor, store, runs, targets)

            cands, load, without = candidates(cfg, sweep, members, per_member, work / "epochs")
            folds = two_folds(sorted({k for s in subjects for k in targets[s]}))
            cross = cross_fit(
                cands, load, targets, subjects, folds, top_k=cfg.ensemble.top_k, n_members=cfg.ensemble.n_members,
                temperature=cfg.ensemble.temperature, selection=cfg.train.selection_metric,
            )
            preds = {s: {k: np.stack([pm[s][k] for pm in per_member]) for k in targets[s]} for s in subjects}
            weights, r_all = refit_weights(preds, targets, subjects, cfg.ensemble.temperature)  # (M, S, P)
            predictor.set_weights(weights)
            member_all = np.nanmean(np.nanmean(r_all, axis=-1), axis=-1)  # (M,)
            best = int(np.argmax(member_all))

            out_dir = Path(cfg.outputs) / "ensembles" / name
            record = crossfit_record(cross)
            info = {
                "temperature": cfg.ensemble.temperature,
                "weights_fit_on": WEIGHTS_FIT_ON,
                "crossfit": record,
                "member_run_ids": [m.run_id for m in members],
                "member_overrides": [m.spec.overrides for m in members],
                "member_seeds": [m.spec.seed for m in members],
                "sweep": cfg.sweep.name,
                "mlflow_run_id": run_id,
            }
            predictor.save(out_dir, info)

            metrics = cross.summary()
            for i in range(len(members)):
                metrics[f"val_r_official/member/{i}"] = float(member_all[i])
            metrics["best_member"] = best
            metrics["n_candidates"] = len(cands)
            tracking.log_metrics(uri, run_id, metrics, step=0)
            tracking.set_tags(uri, run_id, {
                "mirage.member_run_ids": ",".join(m.run_id or "" for m in members),
                "mirage.n_members": len(members),
                "mirage.temperature": cfg.ensemble.temperature,
                "mirage.score": "cross-fitted: 2 folds of the validation runs, each scored by choices made on the other",
                "mirage.crossfit_folds": json.dumps(list(folds)),
                "mirage.crossfit_without_epoch_predictions": ",".join(without) or "none",
            })
            arrays = work / "ensemble"
            arrays.mkdir()
            np.save(arrays / "weights.npy", weights)
            np.save(arrays / "member_r_all_val.npy", r_all.astype(np.float32))
            (arrays / "crossfit.json").write_text(json.dumps(record, indent=2, default=str))
            (arrays / "ensemble.json").write_text((out_dir / "ensemble.json").read_text())
            tracking.log_artifacts(uri, run_id, arrays, "ensemble")
            if cfg.ensemble.analysis:
                _log_analysis(cfg, predictor.member(best), store, runs, targets, subjects, work / "analysis", run_id)
            version = tracking.register_pyfunc_model(cfg, run_id, out_dir)
            decision = tracking.update_champion(cfg, run_id, version, metrics.get(HELDOUT_METRIC), metric=HELDOUT_METRIC)
        tracking.end_run(uri, run_id, "FINISHED")
    except BaseException as e:
        tracking.end_run(uri, run_id, tracking.status_for(e))
        raise
    reg = cfg.ensemble.registry_name
    model_uri = f"models:/{reg}@{cfg.ensemble.alias}" if decision.promoted else f"models:/{reg}/{version}"
    return EnsembleOutcome(run_id, str(out_dir), model_uri, version, members, cross, metrics, time.time() - t0,
                           champion=decision)


def _log_analysis(cfg: Config, member: Predictor, store: FeatureStore, runs: dict[RunKey, Any], targets,
                  subjects: list[str], out: Path, run_id: str) -> None:
    """Interpretability artifacts of one member on every validation run: arrays under ``analysis/``, plots
    under ``figures/<name>/``."""
    modalities = [m for m in MODALITIES if m in member.modalities]  # store order: vision, audio, text
    lengths = {k: len(targets[k.subject][k.name]) for k in runs}
    first = next(iter(runs)).subject  # the stimulus, not the subject, drives the attention: one subject suffices
    attends = member.cfg.model.layer_pool == "cross_attention"  # the other layer pools have no layer attention
    res = analyze(
        lambda drop: nest(predict_stored(member, store, lengths, drop=drop)),
        targets, subjects, modalities,
        attention=member.layer_attention(stored_runs(store, {k: n for k, n in lengths.items() if k.subject == first}))
        if attends else None,
    )
    uri = cfg.tracking.uri
    files = write_analysis(res, out, on_figure=lambda name, fig: tracking.log_figure(uri, run_id, fig, name))
    for f in files:  # the plots went to figures/<name>/ above
        if f.suffix != ".png":
            tracking.log_artifacts(uri, run_id, f, "analysis")
    tracking.log_metrics(cfg.tracking.uri, run_id, {f"subset_r/{k.replace('+', '_')}": v for k, v in res.subset_r.items()}, step=0)
    _log_brain_figures(cfg, res, run_id)


def _log_brain_figures(cfg: Config, res: AnalysisResult, run_id: str) -> None:
    """Brain maps of the analysed member where the dataset ships an atlas: its subject-mean per-parcel r
    (glass brain and surface), the dominant modality (surface) and mean r per Yeo-7 network, under
    ``figures/brain_*``; the network table as ``analysis/networks.json``."""
    from mirage.brain.atlas import find_atlas
    from mirage.brain.maps import plot_dominant_modality, write_maps
    from mirage.brain.networks import network_summary, plot_network_bars

    atlas = find_atlas(cfg.data.root, cfg.data.n_parcels, list(res.subjects))
    if atlas is None:
        return
    import matplotlib.pyplot as plt

    figures = {("brain_map", name): fig for name, fig in write_maps({"val_r_mean": res.val_r.mean(axis=0)}, atlas).items()}
    drops = dict(zip(res.dominance.modalities, res.dominance.drop))
    figures[("brain_dominant_modality", None)] = plot_dominant_modality(drops, atlas, title="dominant modality (ablation)")
    rows = network_summary({"member": dict(zip(res.subjects, res.val_r))}, cfg.data.n_parcels)
    figures[("brain_networks", None)] = plot_network_bars(rows, title="mean r per Yeo-7 network (val)")
    for (folder, file), fig in figures.items():
        tracking.log_figure(cfg.tracking.uri, run_id, fig, folder, file)
        plt.close(fig)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "networks.json").write_text(json.dumps(rows, indent=2, default=float))
        tracking.log_artifacts(cfg.tracking.uri, run_id, Path(d) / "networks.json", "analysis")
