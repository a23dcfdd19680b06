"""Ensembles of independently trained models, combined per subject and parcel.

Each member's validation Pearson r becomes a softmax weight over members (temperature
``cfg.ensemble.temperature``), separately for every subject and parcel. The reported scores are
cross-fitted (:func:`cross_fit`): the validation runs are split into two folds; on one fold each
member's epoch, the top-k configs and the weights are chosen, on the other the ensemble, its best
member (chosen on the fit fold) and its mean member are scored; then the folds swap and the two
scores are averaged, so every validation run is scored once and never by a choice it made. The
weights shipped (submissions, registered model) are refit on every validation run
(:func:`refit_weights`). All r are in the official form (5 edge TRs dropped per run).

Pure numpy: no Ray, no MLflow. The directory layout written by :func:`write_ensemble_dir` is
the one :class:`mirage.predictor.Predictor` reads (``ensemble.json``, ``weights.npy``,
``members/<i>/``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mirage.atomic import replacing_dir
from mirage.data.run_key import RunKey
from mirage.errors import MirageError
from mirage.metrics import EDGE_TRS, concat_trimmed, pearson_r

Predictions = dict[str, dict[str, np.ndarray]]

WEIGHTING_RULE = "softmax(val_r / temperature) over members, per subject and parcel"
ENSEMBLE_FORMAT = "mirage-ensemble/1"


# --------------------------------------------------------------------- weights


def softmax_weights(val_r: np.ndarray, temperature: float) -> np.ndarray:
    """Per-parcel softmax of the members' validation r.

    Args:
        val_r: (n_members, ...) validation r, e.g. (n_members, n_subjects, n_parcels).
            Non-finite values (a constant prediction) count as r = 0.
        temperature: > 0; small values approach "pick the best member per parcel".

    Returns:
        weights, same shape as ``val_r``, float64, summing to 1 over axis 0.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    r = np.nan_to_num(np.asarray(val_r, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    z = r / temperature
    z = z - z.max(axis=0, keepdims=True)  # stable softmax
    e = np.exp(z)
    return e / e.sum(axis=0, keepdims=True)


def combine(preds: np.ndarray, weights: np.ndarray, dtype: np.dtype | type = np.float32) -> np.ndarray:
    """Weighted sum of the members' predictions, summed in float64.

    Args:
        preds: (n_members, n_trs, n_parcels) predictions of one subject's run.
        weights: (n_members, n_parcels) that subject's weights.
        dtype: of the result.

    Returns:
        (n_trs, n_parcels) ``dtype``.
    """
    if preds.ndim != 3 or weights.shape != (preds.shape[0], preds.shape[2]):
        raise ValueError(f"preds {preds.shape} and weights {weights.shape} do not match (M, T, P) / (M, P)")
    return np.einsum("mtp,mp->tp", preds.astype(np.float64), weights).astype(dtype, copy=False)  # (T, P)


# ------------------------------------------------------------------ folds and r


def episode_of(run_name: str) -> str:
    """The episode a validation run belongs to (``s06e01a`` -> ``s06e01``; ``life01#2`` -> ``life01``)."""
    return RunKey.parse("", run_name).episode


def two_folds(run_names: list[str]) -> tuple[list[str], list[str]]:
    """Split the validation runs into two folds, whole episodes together (both halves of an episode in one fold).

    Deterministic: episodes in sorted order go to folds A, B, A, B, ... With a single episode
    its runs alternate between the folds instead.

    Raises:
        MirageError: fewer than 2 runs.
    """
    ids = sorted(set(run_names))
    if len(ids) < 2:
        raise MirageError(
            f"cross-fitted ensembles need at least 2 validation runs (one fold each), got {ids} "
            f"(data.val selects too little)"
        )
    episodes = sorted({episode_of(r) for r in ids})
    if len(episodes) >= 2:
        side = {r: episodes.index(episode_of(r)) % 2 for r in ids}
    else:
        side = {r: i % 2 for i, r in enumerate(ids)}
    return [r for r in ids if side[r] == 0], [r for r in ids if side[r] == 1]


def fold_r(preds: Predictions, targets: Predictions, subjects: list[str], runs: list[str],
           edge_trs: int = EDGE_TRS) -> tuple[np.ndarray, np.ndarray]:
    """Pearson r of one model on one fold, in the official form.

    Per subject, the fold's runs lose ``edge_trs`` TRs at both edges and are concatenated; r per
    parcel. Pooled: the same rows of every subject concatenated.

    Args:
        preds, targets: subject -> run id -> (n_trs, n_parcels).
    Returns:
        (n_subjects, n_parcels) r per subject (NaN rows: a subject without runs in the fold),
        and (n_parcels,) pooled r.
    """
    per, ps, ts = [], [], []
    for sub in subjects:
        have = [k for k in runs if k in targets.get(sub, {})]
        if not have:
            per.append(None)
            continue
        missing = [k for k in have if k not in preds.get(sub, {})]
        if missing:
            raise MirageError(f"ensemble: no prediction for {sub} validation runs {missing}")
        p = concat_trimmed([preds[sub][k] for k in have], edge_trs)
        t = concat_trimmed([targets[sub][k] for k in have], edge_trs)
        per.append(pearson_r(p, t))
        ps.append(p), ts.append(t)
    if not ps:
        raise MirageError(f"ensemble: no subject has validation runs in the fold {runs}")
    n_parcels = ps[0].shape[1]
    r = np.stack([np.full(n_parcels, np.nan) if x is None else x for x in per])  # (S, P)
    return r, pearson_r(np.concatenate(ps), np.concatenate(ts))


def model_score(r: np.ndarray, r_pooled: np.ndarray | None = None, selection: str = "per_subject") -> float:
    """One number per model: mean over subjects of the mean over parcels (``per_subject``) or mean pooled r (``pooled``).

    r: (..., n_subjects, n_parcels) -> (...) when ``per_subject``; r_pooled: (..., n_parcels).
    """
    if selection == "pooled":
        return np.nanmean(r_pooled, axis=-1)
    return np.nanmean(np.nanmean(r, axis=-1), axis=-1)


def weight_entropy(weights: np.ndarray) -> float:
    """Mean over subjects and parcels of the entropy (nats) of the members' weights; log(n_members) when uniform.

    weights: (n_members, n_subjects, n_parcels).
    """
    w = np.clip(np.asarray(weights, np.float64), 1e-300, 1.0)
    return float(np.mean(-(w * np.log(w)).sum(axis=0)))


def refit_weights(preds: dict[str, dict[str, np.ndarray]], targets: Predictions, subjects: list[str],
                  temperature: float, edge_trs: int = EDGE_TRS) -> tuple[np.ndarray, np.ndarray]:
    """Weights fitted on every validation run (for submissions and the registered model).

    Args:
        preds: subject -> run id -> (n_members, n_trs, n_parcels).
    Returns:
        weights (n_members, n_subjects, n_parcels) float32 and the members' r on all runs (same shape).
    """
    runs = sorted({k for s in subjects for k in targets.get(s, {})})
    n_members = next(iter(next(iter(preds.values())).values())).shape[0]
    r = np.stack([
        fold_r({s: {k: v[m] for k, v in preds[s].items()} for s in preds}, targets, subjects, runs, edge_trs)[0]
        for m in range(n_members)
    ])  # (M, S, P)
    return softmax_weights(r, temperature).astype(np.float32), r


# ------------------------------------------------------------------ cross-fitting


@dataclass(frozen=True)
class Candidate:
    """A model that may join the ensemble: its name, its config (the top-k unit) and its saved epochs."""

    name: str
    config: str
    epochs: tuple[int, ...]


@dataclass
class FoldResult:
    """Everything chosen on the fit fold and every score on the other fold.

    ``members``: candidate indices chosen (top-k configs); ``epochs``: their epochs; ``weights``:
    (n_members, n_subjects, n_parcels); ``best``: the member with the best fit-fold score.
    Scores (``*_r``) are on the score fold only, in the official form; ``member_corr`` is the mean
    Pearson r between two members' predictions there (over pairs, subjects and parcels; 1 = no diversity).
    """

    fit_runs: list[str]
    score_runs: list[str]
    configs: list[str]
    members: list[int]
    epochs: list[int]
    weights: np.ndarray
    best: int
    ensemble_r: float
    best_member_r: float
    mean_member_r: float
    entropy: float
    member_corr: float = float("nan")
    ensemble_r_subject: dict[str, float] = field(default_factory=dict)
    best_member_r_subject: dict[str, float] = field(default_factory=dict)


@dataclass
class CrossFit:
    """Two folds, each scored by choices made on the other; the overall scores are the mean over both."""

    subjects: list[str]
    candidates: list[Candidate]
    folds: list[FoldResult]
    temperature: float

    def summary(self) -> dict[str, float]:
        """``ensemble_r``, ``best_member_r``, ``mean_member_r``, ``weight_entropy``, ``member_corr``.

        Overall (mean over the folds) and per fold (``fold<i>/...``); ensemble and best member per subject.
        """
        out: dict[str, float] = {}
        keys = ("ensemble_r", "best_member_r", "mean_member_r")
        for i, f in enumerate(self.folds):
            for k in keys:
                out[f"fold{i}/{k}"] = getattr(f, k)
            out[f"fold{i}/weight_entropy"] = f.entropy
            out[f"fold{i}/member_corr"] = f.member_corr
            out[f"fold{i}/n_members"] = len(f.members)
        for k in keys:
            out[k] = float(np.mean([getattr(f, k) for f in self.folds]))
        out["weight_entropy"] = float(np.mean([f.entropy for f in self.folds]))
        out["member_corr"] = float(np.mean([f.member_corr for f in self.folds]))
        for sub in self.subjects:
            for k in ("ensemble_r", "best_member_r"):
                vals = [getattr(f, f"{k}_subject")[sub] for f in self.folds if sub in getattr(f, f"{k}_subject")]
                if vals:
                    out[f"{k}/{sub}"] = float(np.mean(vals))
        return out


def choose_on_fold(
    candidates: list[Candidate], score: np.ndarray, top_k: int, n_members: int
) -> tuple[list[int], list[int], list[str]]:
    """Each candidate's epoch, the top-k configs and their members, from one fold's scores only.

    Args:
        score: (n_candidates, n_epochs) fit-fold score (NaN: epoch not saved).
    Returns:
        members (candidate indices, best config first, best candidate first within a config),
        their epochs, and the chosen configs.
    """
    ok = [i for i in range(len(candidates)) if np.isfinite(score[i]).any()]
    if not ok:
        raise MirageError("ensemble: no candidate has validation predictions to choose from")
    epoch = {i: int(np.nanargmax(score[i])) for i in ok}
    best = {i: float(score[i, epoch[i]]) for i in ok}
    by_config: dict[str, list[int]] = {}
    for i in ok:
        by_config.setdefault(candidates[i].config, []).append(i)
    config_score = {c: float(np.mean([best[i] for i in idx])) for c, idx in by_config.items()}
    configs = sorted(config_score, key=lambda c: (-config_score[c], c))[:top_k]
    members = [i for c in configs for i in sorted(by_config[c], key=lambda i: (-best[i], i))][:n_members]
    return members, [epoch[i] for i in members], configs


def _member_corr(loaded: list[Predictions], subjects: list[str], runs: list[str], targets: Predictions,
                 edge_trs: int) -> float:
    """Mean Pearson r between two members' predictions over the runs (pairs, subjects, parcels); NaN for one member."""
    vals = []
    for s in subjects:
        have = [k for k in runs if k in targets.get(s, {})]
        if not have:
            continue
        x = [concat_trimmed([p[s][k] for k in have], edge_trs) for p in loaded]  # M x (T, P)
        vals += [pearson_r(x[i], x[j]).mean() for i in range(len(x)) for j in range(i + 1, len(x))]
    return float(np.mean(vals)) if vals else float("nan")


def cross_fit(
    candidates: list[Candidate],
    load: Callable[[int, int], Predictions],
    targets: Predictions,
    subjects: list[str],
    folds: tuple[list[str], list[str]],
    *,
    top_k: int,
    n_members: int,
    temperature: float,
    selection: str = "per_subject",
    edge_trs: int = EDGE_TRS,
) -> CrossFit:
    """Cross-fitted ensemble scores: choose on one fold, score on the other, then swap.

    On the fit fold: each candidate's epoch (its best fit-fold score), the ``top_k`` configs
    (mean fit-fold score of their candidates), at most ``n_members`` members from them, the
    per-subject, per-parcel softmax weights of the members' fit-fold r, and the best member.
    On the score fold: the ensemble's r, the best member's r, the members' mean r. No score
    is computed on runs that chose anything.

    Args:
        candidates: the models that may join (members and other sweep trials).
        load: (candidate index, epoch) -> subject -> run id -> (n_trs, n_parcels) predictions.
        targets: subject -> run id -> (n_trs, n_parcels) measured fMRI.
        folds: two disjoint lists of run ids.
        selection: ``per_subject`` or ``pooled`` (how one number ranks epochs and configs).
    """
    a, b = folds
    if set(a) & set(b):
        raise MirageError(f"cross-fit folds overlap: {sorted(set(a) & set(b))}")
    n_e = max((max(c.epochs) + 1 for c in candidates if c.epochs), default=0)
    n_s = len(subjects)
    r_sub: list[dict[tuple[int, int], np.ndarray]] = [{}, {}]  # fold -> (candidate, epoch) -> (S, P)
    score = np.full((2, len(candidates), max(n_e, 1)), np.nan)
    for i, c in enumerate(candidates):
        for e in c.epochs:
            preds = load(i, e)
            for f, runs in enumerate((a, b)):
                r, rp = fold_r(preds, targets, subjects, runs, edge_trs)
                r_sub[f][(i, e)] = r
                score[f, i, e] = model_score(r, rp, selection)
    results = []
    for fit, sc in ((0, 1), (1, 0)):
        members, epochs, configs = choose_on_fold(candidates, score[fit], top_k, n_members)
        r_fit = np.stack([r_sub[fit][(i, e)] for i, e in zip(members, epochs)])  # (M, S, P)
        w = softmax_weights(r_fit, temperature)  # (M, S, P)
        best = int(np.argmax([score[fit, i, e] for i, e in zip(members, epochs)]))
        score_runs = (a, b)[sc]
        loaded = [load(i, e) for i, e in zip(members, epochs)]
        ens = {s: {k: combine(np.stack([p[s][k] for p in loaded]), w[:, j], np.float64)
                   for k in score_runs if k in targets.get(s, {})}
               for j, s in enumerate(subjects)}  # (T, P) per run
        r_ens, _ = fold_r(ens, targets, subjects, score_runs, edge_trs)  # (S, P)
        r_members = np.stack([r_sub[sc][(i, e)] for i, e in zip(members, epochs)])  # (M, S, P)
        per_member = np.nanmean(np.nanmean(r_members, axis=-1), axis=-1)  # (M,)
        have = [j for j in range(n_s) if np.isfinite(r_ens[j]).all()]
        results.append(FoldResult(
            fit_runs=list((a, b)[fit]), score_runs=list(score_runs), configs=configs, members=members,
            epochs=epochs, weights=w.astype(np.float32), best=best,
            ensemble_r=float(np.nanmean(np.nanmean(r_ens, axis=-1))),
            best_member_r=float(per_member[best]),
            mean_member_r=float(per_member.mean()),
            entropy=weight_entropy(w[:, have]),
            member_corr=_member_corr(loaded, subjects, [k for k in score_runs], targets, edge_trs),
            ensemble_r_subject={subjects[j]: float(r_ens[j].mean()) for j in have},
            best_member_r_subject={subjects[j]: float(r_members[best, j].mean()) for j in have},
        ))
    return CrossFit(list(subjects), list(candidates), results, temperature)


# ------------------------------------------------------------------- members


@dataclass(frozen=True)
class MemberSpec:
    """One ensemble member: a sweep config (dotted overrides) trained with one seed."""

    index: int
    overrides: dict[str, Any]
    seed: int
    source: str = ""


def choose_members(
    ranked: list[dict[str, Any]], top_k: int, n_members: int, base_seed: int, sources: list[str] | None = None
) -> list[MemberSpec]:
    """Members = the ``top_k`` best configs times seeds, ``n_members`` in all.

    Member ``i`` trains config ``i % k`` with seed ``base_seed + i // k`` (k = min(top_k,
    len(ranked))), so every config gets its original seed first.

    Args:
        ranked: the sweep's configs (dotted overrides), best first.
        sources: optional name per ranked config (e.g. the trial id), recorded on the member.
    """
    if not ranked:
        raise MirageError("ensemble: the sweep has no finished trial to choose members from")
    k = min(top_k, len(ranked))
    names = sources or [""] * len(ranked)
    return [
        MemberSpec(index=i, overrides=dict(ranked[i % k]), seed=base_seed + i // k, source=names[i % k])
        for i in range(n_members)
    ]


# ------------------------------------------------------------------- directory


def write_ensemble_dir(
    out: str | Path,
    member_dirs: list[str | Path],
    weights: np.ndarray,
    subjects: list[str],
    info: dict[str, Any],
) -> Path:
    """Write an ensemble directory atomically (:func:`mirage.atomic.replacing_dir`).

    Built in a unique temporary folder beside ``out`` and swapped in; a failure while writing
    leaves an existing ``out`` as it was and no temporary folder behind.

    Layout: ``ensemble.json`` (format, members, subjects, weighting rule, ``info``),
    ``weights.npy`` (n_members, n_subjects, n_parcels) float32, ``members/<i>/`` copies of the
    members' exported model directories.
    """
    out = Path(out)
    if weights.ndim != 3 or weights.shape[:2] != (len(member_dirs), len(subjects)):
        raise ValueError(f"weights {weights.shape} do not match {len(member_dirs)} members x {len(subjects)} subjects")
    meta = {
        "format": ENSEMBLE_FORMAT,
        "n_members": len(member_dirs),
        "members": [f"members/{i}" for i in range(len(member_dirs))],
        "subjects": list(subjects),
        "weighting": WEIGHTING_RULE,
        **info,
    }
    with replacing_dir(out) as tmp:
        (tmp / "members").mkdir()
        for i, src in enumerate(member_dirs):
            shutil.copytree(src, tmp / "members" / str(i))
        np.save(tmp / "weights.npy", weights.astype(np.float32))
        (tmp / "ensemble.json").write_text(json.dumps(meta, indent=2, default=str))
    return out
