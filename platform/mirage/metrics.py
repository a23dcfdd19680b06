"""Encoding metrics: per-parcel Pearson r, the Algonauts 2025 score, noise ceilings.

All vectorised over parcels (no Python loop over parcels); rows are time. A
parcel whose prediction or fMRI is constant over the rows used gets r = 0.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from mirage.errors import DataError

METRIC_VERSION = "2"
EDGE_TRS = 5
"""TRs dropped at each end of every chunk before scoring (official Algonauts 2025 test code, S7 and OOD)."""


def pearson_r(pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None, eps: float = 1e-12) -> np.ndarray:
    """Pearson r of each column over rows.

    pred, target: (n_trs, n_parcels) (or (..., n_trs, n_parcels): r over axis -2).
    mask: bool (n_trs,) or (..., n_trs) (broadcast): rows that count (padding rows False); None = all.
    Returns float64 (n_parcels,) (or (..., n_parcels)).
    """
    x = np.asarray(pred, dtype=np.float64)
    y = np.asarray(target, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"pearson_r: prediction shape {x.shape} != target shape {y.shape}")
    if mask is None:
        w = np.ones(x.shape[:-1] + (1,))
    else:
        try:
            w = np.broadcast_to(np.asarray(mask, dtype=np.float64), x.shape[:-1])[..., None]  # (..., T, 1)
        except ValueError:
            raise ValueError(f"pearson_r: mask shape {np.shape(mask)} does not match rows {x.shape[:-1]}") from None
    n = w.sum(axis=-2)  # (..., 1)
    n_safe = np.maximum(n, 1.0)
    mx = (w * x).sum(axis=-2, keepdims=True) / n_safe[..., None, :]  # (..., 1, P)
    my = (w * y).sum(axis=-2, keepdims=True) / n_safe[..., None, :]
    dx, dy = w * (x - mx), w * (y - my)  # (..., T, P)
    cov = (dx * dy).sum(axis=-2)  # (..., P)
    vx, vy = (dx * dx).sum(axis=-2), (dy * dy).sum(axis=-2)
    den = np.sqrt(vx * vy)
    return np.where(den > eps, cov / np.where(den > eps, den, 1.0), 0.0)


def pearson_r_torch(pred, target, mask=None, eps: float = 1e-8):
    """Torch twin of :func:`pearson_r` (differentiable, any device), computed in float32 or wider.

    pred, target: Tensor (..., n_trs, n_parcels); mask: bool Tensor (..., n_trs) or None.
    Returns Tensor (..., n_parcels).
    """
    import torch  # the numpy metrics load without torch; only the twin needs it

    dtype = torch.promote_types(pred.dtype, torch.float32)
    x, y = pred.to(dtype), target.to(dtype)
    w = torch.ones_like(x[..., :1]) if mask is None else mask.to(dtype).unsqueeze(-1)  # (..., T, 1)
    n = w.sum(dim=-2, keepdim=True).clamp_min(1.0)  # (..., 1, 1)
    mx = (w * x).sum(dim=-2, keepdim=True) / n  # (..., 1, P)
    my = (w * y).sum(dim=-2, keepdim=True) / n
    dx, dy = w * (x - mx), w * (y - my)  # (..., T, P)
    cov = (dx * dy).sum(dim=-2)  # (..., P)
    den = torch.sqrt((dx * dx).sum(dim=-2) * (dy * dy).sum(dim=-2))
    return torch.where(den > eps, cov / den.clamp_min(eps), torch.zeros_like(cov))


def chunk_group(chunk: str) -> str:
    """Scoring group of a chunk key: the movie for OOD (``chaplin1`` -> ``chaplin``), the season for Friends."""
    m = re.match(r"^(s\d+)e\d+[a-z]?$", chunk)
    if m:
        return m.group(1)
    return re.sub(r"\d+$", "", chunk) or chunk


def trim_edges(x: np.ndarray, edge_trs: int = EDGE_TRS) -> np.ndarray:
    """Rows ``edge_trs .. n - edge_trs`` of a chunk (axis -2 is time); at most 2 * edge_trs rows leave it empty.

    x: (..., n_trs, n_parcels) -> (..., max(n_trs - 2 * edge_trs, 0), n_parcels).
    """
    n = x.shape[-2]
    if edge_trs <= 0:
        return x
    return x[..., edge_trs: max(n - edge_trs, edge_trs), :]


def concat_trimmed(chunks: list[np.ndarray], edge_trs: int = EDGE_TRS) -> np.ndarray:
    """Chunks with their edges dropped, concatenated over time (axis -2), as the official rule scores them."""
    return np.concatenate([trim_edges(np.asarray(c), edge_trs) for c in chunks], axis=-2)


@dataclass
class AlgonautsScore:
    """Mean r over subjects; per subject; per subject and group; per-parcel r (subject -> group -> (P,))."""

    score: float
    subjects: dict[str, float]
    groups: dict[str, dict[str, float]]
    parcels: dict[str, dict[str, np.ndarray]] = field(repr=False)
    version: str = METRIC_VERSION

    def flat(self) -> dict[str, float]:
        """``{"score": .., "<subject>": .., "<subject>/<group>": ..}`` (for MLflow)."""
        out = {"score": self.score, **self.subjects}
        for sub, g in self.groups.items():
            out.update({f"{sub}/{k}": v for k, v in g.items()})
        return out


def algonauts_score(
    predictions: Mapping[str, Mapping[str, np.ndarray]],
    targets: Mapping[str, Mapping[str, np.ndarray]],
    edge_trs: int = EDGE_TRS,
    group: Callable[[str], str] = chunk_group,
) -> AlgonautsScore:
    """The Algonauts 2025 rule, as in the official test code for Friends S7 and the OOD movies.

    Per subject and group (an OOD movie; a Friends season): drop the first and last
    ``edge_trs`` TRs of each chunk (episode half or movie split), concatenate the chunks,
    Pearson r per parcel, mean over parcels; then mean over groups, then over subjects.
    Friends S7 is one group (``s07``), so its score is the r of all episodes concatenated
    after each lost its edges; the validation season S06 is scored the same way.

    predictions, targets: subject -> chunk key -> (n_trs, n_parcels); every target chunk
    needs a prediction of the same shape. Raises DataError naming the subject/chunk otherwise.
    """
    parcels: dict[str, dict[str, np.ndarray]] = {}
    groups: dict[str, dict[str, float]] = {}
    subjects: dict[str, float] = {}
    for sub in sorted(targets):
        if sub not in predictions:
            raise DataError(f"score: no predictions for subject {sub}")
        by_group: dict[str, tuple[list, list]] = {}
        for chunk in sorted(targets[sub]):
            if chunk not in predictions[sub]:
                raise DataError(f"score: no prediction for {sub}/{chunk}")
            p, t = np.asarray(predictions[sub][chunk]), np.asarray(targets[sub][chunk])
            if p.shape != t.shape or p.ndim != 2:
                raise DataError(f"score: {sub}/{chunk}: prediction shape {p.shape}, expected the fMRI shape {t.shape}")
            if not np.isfinite(p).all():
                raise DataError(f"score: {sub}/{chunk}: prediction holds NaN/inf")
            ps, ts = by_group.setdefault(group(chunk), ([], []))
            ps.append(trim_edges(p, edge_trs))
            ts.append(trim_edges(t, edge_trs))
        parcels[sub], groups[sub] = {}, {}
        for g, (ps, ts) in by_group.items():
            p, t = np.concatenate(ps), np.concatenate(ts)
            if len(p) < 2:
                raise DataError(f"score: {sub}/{g}: fewer than 2 TRs left after dropping {edge_trs} TRs at each edge")
            r = pearson_r(p, t)
            parcels[sub][g] = r
            groups[sub][g] = float(r.mean())
        if not groups[sub]:
            raise DataError(f"score: no chunks for subject {sub}")
        subjects[sub] = float(np.mean(list(groups[sub].values())))
    if not subjects:
        raise DataError("score: no subjects in the targets")
    return AlgonautsScore(float(np.mean(list(subjects.values()))), subjects, groups, parcels)


def sem(x: np.ndarray) -> float:
    """Standard error of the mean of the values ``x`` (n,): sample std (ddof=1) / sqrt(n); 0 for n < 2."""
    x = np.asarray(x, dtype=np.float64)
    return float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0


def noise_ceiling_split_half(run_a: np.ndarray, run_b: np.ndarray) -> np.ndarray:
    """Noise ceiling from two repeats of one stimulus (e.g. Movie10 ``_run-1``/``_run-2``).

    run_a, run_b: (n_trs, n_parcels). Under signal + independent noise, the repeat
    correlation r_ab equals the reliability of one run, and the largest r a model can reach
    with one run is sqrt(r_ab). Returns (n_parcels,) in [0, 1] (negative r_ab -> 0).
    """
    r = pearson_r(run_a, run_b)
    return np.sqrt(np.clip(r, 0.0, 1.0))


def noise_ceiling_normalized(r: np.ndarray, ceiling: np.ndarray, min_ceiling: float = 0.1) -> np.ndarray:
    """r / ceiling per parcel; NaN where the ceiling is missing (NaN) or below ``min_ceiling`` (parcel not
    reliable enough). Not clipped at 1: a noisy ceiling estimate can be exceeded.

    r: (..., n_parcels); ceiling: (n_parcels,) (the largest attainable r, e.g. :func:`noise_ceiling_split_half`).
    Returns float64 of r's shape. Average with ``np.nanmean``; excluded parcels: ``np.isnan(out).sum()``.
    """
    r, c = np.asarray(r, np.float64), np.asarray(ceiling, np.float64)
    if c.ndim != 1 or r.shape[-1:] != c.shape:
        raise DataError(f"noise_ceiling_normalized: r {r.shape} and ceiling {c.shape}; expected r (..., P) and ceiling (P,)")
    ok = np.isfinite(c) & (c >= min_ceiling)
    return np.where(ok, r / np.where(ok, c, 1.0), np.nan)
