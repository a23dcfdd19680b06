"""Ensembles of independently trained models, combined per subject and parcel.

Each member's validation Pearson r on the *fit* part of the validation runs becomes a
softmax weight over members (temperature ``cfg.ensemble.temperature``), separately for every
subject and parcel; the ensemble is scored on the *other* part of the validation runs, so its
reported score is never fitted on itself.

Pure numpy: no Ray, no MLflow. The directory layout written by :func:`write_ensemble_dir` is
the one :class:`mirage.predictor.Predictor` reads (``ensemble.json``, ``weights.npy``,
``members/<i>/``).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mirage.errors import MirageError
from mirage.metrics import pearson_r

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


def combine(preds: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted sum of the members' predictions.

    Args:
        preds: (n_members, n_trs, n_parcels) predictions of one subject's run.
        weights: (n_members, n_parcels) that subject's weights.

    Returns:
        (n_trs, n_parcels) float32.
    """
    if preds.ndim != 3 or weights.shape != (preds.shape[0], preds.shape[2]):
        raise ValueError(f"preds {preds.shape} and weights {weights.shape} do not match (M, T, P) / (M, P)")
    return np.einsum("mtp,mp->tp", preds.astype(np.float64), weights).astype(np.float32)  # (T, P)


# ------------------------------------------------------------------ fit / score


def split_fit_score(stimuli: list[str], fit_fraction: float) -> tuple[list[str], list[str]]:
    """Split the validation stimuli into a part that fits the weights and a part that scores.

    Deterministic: the first ``round(n * fit_fraction)`` stimuli in sorted order fit (at least
    one, and at least one left to score).

    Raises:
        MirageError: fewer than 2 validation stimuli.
    """
    ids = sorted(set(stimuli))
    if len(ids) < 2:
        raise MirageError(
            f"ensemble weights need at least 2 validation runs (one to fit, one to score), "
            f"got {ids} (data.val selects too little)"
        )
    n_fit = min(max(int(round(len(ids) * fit_fraction)), 1), len(ids) - 1)
    return ids[:n_fit], ids[n_fit:]


@dataclass
class EnsembleFit:
    """Weights fitted on one part of the validation runs, scores on the other part.

    Shapes: ``weights`` (n_members, n_subjects, n_parcels); ``fit_r`` likewise (the members'
    r on the fit runs); ``member_r`` (n_members, n_subjects, n_parcels) and ``ensemble_r``
    (n_subjects, n_parcels) on the held-out score runs.
    """

    subjects: list[str]
    fit_stimuli: list[str]
    score_stimuli: list[str]
    temperature: float
    weights: np.ndarray
    fit_r: np.ndarray
    member_r: np.ndarray
    ensemble_r: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def best_member(self) -> int:
        """Index of the member with the highest held-out mean r (over subjects and parcels)."""
        return int(np.argmax(self.member_r.mean(axis=(1, 2))))

    def summary(self) -> dict[str, float]:
        """Held-out metrics: ensemble and best single member, overall and per subject."""
        b = self.best_member
        out = {"ensemble_r": float(self.ensemble_r.mean()), "best_member_r": float(self.member_r[b].mean())}
        for s, sub in enumerate(self.subjects):
            out[f"ensemble_r/{sub}"] = float(self.ensemble_r[s].mean())
            out[f"best_member_r/{sub}"] = float(self.member_r[b, s].mean())
        return out


def _concat(runs: dict[str, np.ndarray], keys: list[str]) -> np.ndarray:
    return np.concatenate([runs[k] for k in keys], axis=-2)


def fit_ensemble(
    preds: dict[str, dict[str, np.ndarray]],
    targets: dict[str, dict[str, np.ndarray]],
    subjects: list[str],
    fit_fraction: float,
    temperature: float,
) -> EnsembleFit:
    """Fit per-subject, per-parcel weights on part of the validation runs; score on the rest.

    Args:
        preds: subject -> stimulus id -> (n_members, n_trs, n_parcels) member predictions.
        targets: subject -> stimulus id -> (n_trs, n_parcels) measured fMRI (same keys).
        subjects: subject order of the weight array.
        fit_fraction: share of validation stimuli that fit the weights.
        temperature: softmax temperature.

    Runs are concatenated over time inside each part before Pearson r is taken.
    """
    stimuli = sorted({k for s in subjects for k in targets.get(s, {})})
    fit_ids, score_ids = split_fit_score(stimuli, fit_fraction)
    fit_r, member_r, ens_r, weights = [], [], [], []
    for sub in subjects:
        have = set(targets.get(sub, {})) & set(preds.get(sub, {}))
        f_ids, s_ids = [k for k in fit_ids if k in have], [k for k in score_ids if k in have]
        if not f_ids or not s_ids:
            raise MirageError(
                f"ensemble: subject {sub} lacks validation runs to fit ({f_ids}) or score ({s_ids}); "
                f"expected fMRI for some of {fit_ids} and of {score_ids}"
            )
        p_fit, t_fit = _concat(preds[sub], f_ids), _concat(targets[sub], f_ids)  # (M, T, P), (T, P)
        r_fit = pearson_r(p_fit, np.broadcast_to(t_fit, p_fit.shape))  # (M, P)
        w = softmax_weights(r_fit, temperature)  # (M, P)
        p_sc, t_sc = _concat(preds[sub], s_ids), _concat(targets[sub], s_ids)
        r_members = pearson_r(p_sc, np.broadcast_to(t_sc, p_sc.shape))  # (M, P)
        r_ens = pearson_r(combine(p_sc, w), t_sc)  # (P,)
        fit_r.append(r_fit), member_r.append(r_members), ens_r.append(r_ens), weights.append(w)
    return EnsembleFit(
        subjects=list(subjects),
        fit_stimuli=fit_ids,
        score_stimuli=score_ids,
        temperature=temperature,
        weights=np.stack(weights, axis=1).astype(np.float32),  # (M, S, P)
        fit_r=np.stack(fit_r, axis=1),
        member_r=np.stack(member_r, axis=1),
        ensemble_r=np.stack(ens_r),
    )


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
    """Write an ensemble directory (atomically: a temp folder renamed into place).

    Layout: ``ensemble.json`` (format, members, subjects, weighting rule, ``info``),
    ``weights.npy`` (n_members, n_subjects, n_parcels) float32, ``members/<i>/`` copies of the
    members' exported model directories.
    """
    out = Path(out)
    if weights.ndim != 3 or weights.shape[:2] != (len(member_dirs), len(subjects)):
        raise ValueError(f"weights {weights.shape} do not match {len(member_dirs)} members x {len(subjects)} subjects")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "members").mkdir(parents=True)
    for i, src in enumerate(member_dirs):
        shutil.copytree(src, tmp / "members" / str(i))
    np.save(tmp / "weights.npy", weights.astype(np.float32))
    meta = {
        "format": ENSEMBLE_FORMAT,
        "n_members": len(member_dirs),
        "members": [f"members/{i}" for i in range(len(member_dirs))],
        "subjects": list(subjects),
        "weighting": WEIGHTING_RULE,
        **info,
    }
    (tmp / "ensemble.json").write_text(json.dumps(meta, indent=2, default=str))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
