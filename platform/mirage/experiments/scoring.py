"""How an experiment scores a trained model: per-subject, per-parcel r on every split with fMRI.

The rule is the official one (:func:`mirage.metrics.algonauts_score`, as ``mirage score`` uses it):
runs z-scored (when ``data.zscore``), 5 TRs dropped at both edges of every run, runs concatenated per
subject and group (a Friends season, an OOD movie), Pearson r per parcel, groups averaged. A split
(:data:`mirage.experiments.spec.SPLITS`) is scored only where the release holds its fMRI (the
test splits of the Algonauts release and of the synthetic dataset hold none).

:class:`Scores` is what a trial leaves in MLflow (``experiment/scores.npz``) and what the report
reads back: r per split (n_subjects, n_parcels), and one validation run per subject measured and
predicted for the time-course figure. Pure numpy/torch: no Ray, no MLflow.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mirage.config import Config
from mirage.data.fmri import load_fmri, zscore
from mirage.data.layout import Release
from mirage.data.run_key import RunKey, run_keys
from mirage.data.splits import split_runs
from mirage.errors import DataError
from mirage.experiments.spec import SPLIT_SELECTORS
from mirage.features.store import FeatureStore
from mirage.metrics import EDGE_TRS, algonauts_score

RunArrays = dict[RunKey, np.ndarray]


@dataclass
class Scores:
    """Per-parcel scores of one model (or ensemble, or baseline).

    Attributes:
        subjects: subject ids, the row order of every array.
        r: split -> (n_subjects, n_parcels) official-form r; a row of NaN where a subject has no run.
        missing: splits asked for that the dataset holds no fMRI for.
        timecourses: subject -> {"run": name, "measured": (T, P), "predicted": (T, P)} of its first
            validation run (z-scored measured fMRI; empty for baselines).
        probes: stage -> (n_subjects, n_parcels) held-out r of a linear probe of that stage on the
            validation runs (:mod:`mirage.probes`; empty unless the report draws probes).
        attention: modality -> (heads, n_queries, n_layers) layer attention over the validation windows
            (:func:`mirage.analysis.attention_views`; empty unless the report draws attention).
    """

    subjects: list[str]
    r: dict[str, np.ndarray] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    timecourses: dict[str, dict[str, Any]] = field(default_factory=dict)
    probes: dict[str, np.ndarray] = field(default_factory=dict)
    attention: dict[str, np.ndarray] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        """``r_<split>`` (mean over subjects of the mean over parcels) and ``r_<split>/<subject>``."""
        out: dict[str, float] = {}
        for split, r in self.r.items():
            per = {s: float(np.nanmean(row)) for s, row in zip(self.subjects, r) if np.isfinite(row).any()}
            if per:
                out[f"r_{split}"] = float(np.mean(list(per.values())))
                out.update({f"r_{split}/{s}": v for s, v in per.items()})
        for stage, r in self.probes.items():
            if np.isfinite(r).any():
                out[f"probe_{stage}"] = float(np.nanmean(r))
        return out

    def to_bytes(self) -> bytes:
        """An ``.npz`` blob: ``subjects``, ``missing``, ``r/<split>``, ``tc/<subject>/{run,measured,predicted}``,
        ``probe/<stage>``, ``attn/<modality>``."""
        arrays: dict[str, np.ndarray] = {"subjects": np.array(self.subjects), "missing": np.array(self.missing, dtype=str)}
        for split, r in self.r.items():
            arrays[f"r/{split}"] = np.asarray(r, np.float32)
        for stage, r in self.probes.items():
            arrays[f"probe/{stage}"] = np.asarray(r, np.float32)
        for mod, a in self.attention.items():
            arrays[f"attn/{mod}"] = np.asarray(a, np.float32)
        for sub, tc in self.timecourses.items():
            arrays[f"tc/{sub}/run"] = np.array(tc["run"])
            arrays[f"tc/{sub}/measured"] = np.asarray(tc["measured"], np.float16)
            arrays[f"tc/{sub}/predicted"] = np.asarray(tc["predicted"], np.float16)
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, blob: bytes) -> "Scores":
        with np.load(io.BytesIO(blob), allow_pickle=False) as z:
            out = cls(subjects=[str(s) for s in z["subjects"]], missing=[str(s) for s in z["missing"]])
            for k in z.files:
                parts = k.split("/")
                if parts[0] == "r":
                    out.r[parts[1]] = z[k].astype(np.float32)
                elif parts[0] == "probe":
                    out.probes[parts[1]] = z[k].astype(np.float32)
                elif parts[0] == "attn":
                    out.attention[parts[1]] = z[k].astype(np.float32)
                elif parts[0] == "tc":
                    tc = out.timecourses.setdefault(parts[1], {})
                    tc[parts[2]] = str(z[k]) if parts[2] == "run" else z[k].astype(np.float32)
        return out


def split_config(cfg: Config, split: str) -> Config:
    """``cfg`` whose ``data.val`` selects ``split``'s stimuli (``val``: unchanged)."""
    if split == "val":
        return cfg
    return cfg.with_overrides({"data.val": list(SPLIT_SELECTORS[split])})


def split_run_keys(cfg: Config, split: str) -> list[tuple[RunKey, Any]]:
    """(RunKey, FmriRun) of every run of ``split`` with fMRI, for ``cfg.data.subjects``, in release order."""
    scfg = split_config(cfg, split)
    subjects = set(cfg.data.subjects)
    runs = [r for r in split_runs(Release(cfg.data.root), scfg.data, "val") if r.subject in subjects]
    return run_keys(runs)


def targets_of(cfg: Config, keys: Sequence[tuple[RunKey, Any]]) -> RunArrays:
    """Measured fMRI of each run, (n_trs, n_parcels), z-scored per run when ``data.zscore``."""
    out = {}
    for key, run in keys:
        y = load_fmri(str(run.path), run.key)
        out[key] = zscore(y) if cfg.data.zscore else y
    return out


def official_r(preds: RunArrays, targets: RunArrays, subjects: Sequence[str], n_parcels: int) -> np.ndarray:
    """(n_subjects, n_parcels) per-parcel r under the official rule (NaN: the subject has no run).

    :func:`mirage.metrics.algonauts_score`: per subject and group (a Friends season, an OOD movie) the
    runs lose their edge TRs and are concatenated, r per parcel; a parcel's value here is its mean over
    the groups, so the mean over parcels is the subject's official score.

    preds, targets: RunKey -> (n_trs, n_parcels), the same keys and lengths.
    """
    out = np.full((len(subjects), n_parcels), np.nan, np.float32)
    if not targets:
        return out
    nested_p: dict[str, dict[str, np.ndarray]] = {}
    nested_t: dict[str, dict[str, np.ndarray]] = {}
    for k, t in targets.items():
        nested_t.setdefault(k.subject, {})[k.name] = t
        nested_p.setdefault(k.subject, {})[k.name] = preds[k]
    parcels = algonauts_score(nested_p, nested_t, edge_trs=EDGE_TRS).parcels
    for i, s in enumerate(subjects):
        if s in parcels:
            out[i] = np.mean(list(parcels[s].values()), axis=0)
    return out


def score_predictions(
    cfg: Config, splits: Sequence[str], predict, subjects: Sequence[str], n_parcels: int
) -> Scores:
    """Score a prediction function on every split with fMRI.

    Args:
        predict: ``{RunKey: n_trs} -> {RunKey: (n_trs, n_parcels)}`` (a model, or the mean of several).
        subjects: the row order of the arrays.
    """
    scores = Scores(subjects=list(subjects))
    for split in splits:
        keys = split_run_keys(cfg, split)
        if not keys:
            scores.missing.append(split)
            continue
        targets = targets_of(cfg, keys)
        preds = predict({k: len(v) for k, v in targets.items()})
        scores.r[split] = official_r(preds, targets, subjects, n_parcels)
        if split == "val":
            for k in targets:
                if k.subject not in scores.timecourses:
                    scores.timecourses[k.subject] = {"run": k.name, "measured": targets[k], "predicted": preds[k]}
    return scores


def score_models(cfg: Config, predictors: Sequence, store: FeatureStore, splits: Sequence[str]) -> Scores:
    """Score one model, or the equal-weight mean of several, on every split with fMRI.

    predictors: :class:`mirage.predictor.Predictor` objects with the same subjects and parcels.
    """
    from mirage.predictor import predict_stored

    if not predictors:
        raise DataError("score_models: no model to score")
    first = predictors[0]

    def predict(lengths: dict[RunKey, int]) -> RunArrays:
        total: RunArrays = {}
        for p in predictors:
            for k, v in predict_stored(p, store, lengths).items():
                total[k] = total[k] + v if k in total else v.astype(np.float64)
        return {k: (v / len(predictors)).astype(np.float32) for k, v in total.items()}

    return score_predictions(cfg, splits, predict, first.subjects, first.n_parcels)


def add_probes(scores: Scores, predictor, cfg: Config) -> None:
    """Linear probes of every stage of a single model on the validation runs, rows in ``scores.subjects`` order.

    Raises:
        DataError: a subject has fewer than two validation runs (a probe holds whole runs out).
    """
    from mirage.probes import validation_probes

    res = validation_probes(predictor, cfg)
    for stage, r in res.r.items():
        out = np.full((len(scores.subjects), r.shape[1]), np.nan, np.float32)
        for i, s in enumerate(res.subjects):
            if s in scores.subjects:
                out[scores.subjects.index(s)] = r[i]
        scores.probes[stage] = out


def add_attention(scores: Scores, predictor, cfg: Config, store: FeatureStore) -> None:
    """Layer attention of a cross-attention model per modality over every validation window (heads, Q, L)."""
    from mirage.analysis import attention_views
    from mirage.predictor import stored_runs

    keys = split_run_keys(cfg, "val")
    if not keys:
        return
    targets = targets_of(cfg, keys)
    runs = stored_runs(store, {k: len(v) for k, v in targets.items()})
    for mod, batches in predictor.layer_attention(runs).items():
        scores.attention[mod] = attention_views(batches).per_head_query


def baseline_scores(cfg: Config, subjects: Sequence[str], r_val: np.ndarray, splits: Sequence[str]) -> Scores:
    """A fitted baseline's validation r (already official-form) as :class:`Scores`; other splits are
    reported missing when they have no fMRI and are left unscored otherwise."""
    scores = Scores(subjects=list(subjects), r={"val": np.asarray(r_val, np.float32)})
    for split in splits:
        if split != "val" and not split_run_keys(cfg, split):
            scores.missing.append(split)
    return scores
