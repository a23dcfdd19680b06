"""Interpretability of a trained model: the paper's figures as arrays and PNG plots.

- layer attention profile per modality, averaged over heads and queries (Fig. 4);
- per-parcel validation r and per-subject r;
- dominant modality per parcel from modality ablation, with its dominance strength (Fig. 2b);
- mean r for every subset of modalities (Fig. 2c).

Pure numpy/matplotlib (Agg): the maths takes predictions and attention weights, as
:class:`mirage.predictor.Predictor` gives them (``predict_runs(..., drop=...)``,
``layer_attention``); no model, no Ray, no MLflow here.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mirage.metrics import pearson_r

# subject -> stimulus id -> (n_trs, n_parcels)
RunArrays = dict[str, dict[str, np.ndarray]]
PredictFn = Callable[[tuple[str, ...]], RunArrays]
"""Predictions of every validation run with the given modalities dropped."""


def layer_profile(attn: Iterable[np.ndarray]) -> np.ndarray:
    """Mean attention over layers of one modality.

    Args:
        attn: batches of attention weights, each (B, T, heads, Q, L) (softmax over L).

    Returns:
        (L,) attention averaged over batches, frames, heads and queries (sums to 1).
    """
    total, count = None, 0
    for a in attn:
        a = np.asarray(a, dtype=np.float64)
        s = a.reshape(-1, a.shape[-1]).sum(axis=0)  # (L,)
        total = s if total is None else total + s
        count += int(np.prod(a.shape[:-1]))
    if total is None or count == 0:
        raise ValueError("layer_profile: no attention batches given")
    return total / count


def per_parcel_r(preds: RunArrays, targets: RunArrays, subjects: list[str]) -> np.ndarray:
    """Pearson r per subject and parcel over all runs concatenated: (n_subjects, n_parcels)."""
    out = []
    for sub in subjects:
        keys = sorted(set(preds.get(sub, {})) & set(targets.get(sub, {})))
        if not keys:
            raise ValueError(f"per_parcel_r: no run with both prediction and fMRI for {sub}")
        p = np.concatenate([preds[sub][k] for k in keys])  # (T, P)
        t = np.concatenate([targets[sub][k] for k in keys])
        out.append(pearson_r(p, t))
    return np.stack(out)


def modality_subsets(modalities: list[str]) -> list[tuple[str, ...]]:
    """Every non-empty subset of the modalities, smallest first, in the given order."""
    return [c for n in range(1, len(modalities) + 1) for c in itertools.combinations(modalities, n)]


@dataclass
class Dominance:
    """Dominant modality per parcel from ablation.

    ``drop`` (n_modalities, n_parcels): r(full) - r(without modality m), subject-averaged;
    ``dominant`` (n_parcels,) index of the modality whose removal costs most;
    ``strength`` (n_parcels,) that modality's share of the summed positive drops, in [0, 1]
    (0 where no removal lowers r).
    """

    modalities: list[str]
    drop: np.ndarray
    dominant: np.ndarray
    strength: np.ndarray

    def names(self) -> list[str]:
        return [self.modalities[i] for i in self.dominant]


def dominance(full_r: np.ndarray, without_r: dict[str, np.ndarray], modalities: list[str]) -> Dominance:
    """Dominant modality per parcel.

    Args:
        full_r: (n_parcels,) r with all modalities.
        without_r: modality -> (n_parcels,) r with that modality dropped.
    """
    drop = np.stack([full_r - without_r[m] for m in modalities])  # (M, P)
    pos = np.clip(drop, 0, None)
    total = pos.sum(axis=0)
    dom = np.argmax(drop, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        strength = np.where(total > 0, pos.max(axis=0) / total, 0.0)
    return Dominance(list(modalities), drop, dom, strength)


@dataclass
class AnalysisResult:
    """Everything :func:`analyze` computes (arrays named as in the written files)."""

    subjects: list[str]
    modalities: list[str]
    val_r: np.ndarray  # (n_subjects, n_parcels)
    subject_r: np.ndarray  # (n_subjects,)
    subset_r: dict[str, float]  # "text+audio" -> mean r
    dominance: Dominance
    layer_profiles: dict[str, np.ndarray]  # modality -> (L,)


def analyze(
    predict: PredictFn,
    targets: RunArrays,
    subjects: list[str],
    modalities: list[str],
    attention: dict[str, list[np.ndarray]] | None = None,
) -> AnalysisResult:
    """Run the ablations through ``predict`` and compute every figure's numbers.

    ``predict(drop)`` returns predictions of the validation runs with the modalities in
    ``drop`` removed; ``attention`` maps modality -> batches (B, T, heads, Q, L).
    """
    subset_r: dict[str, float] = {}
    r_by_subset: dict[tuple[str, ...], np.ndarray] = {}
    for keep in modality_subsets(modalities):
        drop = tuple(m for m in modalities if m not in keep)
        r = per_parcel_r(predict(drop), targets, subjects)  # (S, P)
        r_by_subset[keep] = r
        subset_r["+".join(keep)] = float(r.mean())
    full = r_by_subset[tuple(modalities)]
    without = {m: r_by_subset[tuple(x for x in modalities if x != m)].mean(axis=0) for m in modalities}
    dom = dominance(full.mean(axis=0), without, modalities) if len(modalities) > 1 else dominance(
        full.mean(axis=0), {modalities[0]: np.zeros(full.shape[1])}, modalities
    )
    profiles = {m: layer_profile(b) for m, b in (attention or {}).items() if b}
    return AnalysisResult(list(subjects), list(modalities), full, full.mean(axis=1), subset_r, dom, profiles)


# ------------------------------------------------------------------- writing


def write_analysis(res: AnalysisResult, out_dir: str | Path) -> list[Path]:
    """Write the arrays (.npy, summary.json) and the plots (.png); returns the files written."""
    import matplotlib  # heavy, and only for plots: imported when plots are written

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []

    def save_npy(name: str, arr: np.ndarray) -> None:
        np.save(out / name, arr)
        files.append(out / name)

    def save_fig(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        files.append(out / name)

    save_npy("val_r.npy", res.val_r.astype(np.float32))
    save_npy("subject_r.npy", res.subject_r.astype(np.float32))
    save_npy("dominant_modality.npy", res.dominance.dominant.astype(np.int64))
    save_npy("dominance_strength.npy", res.dominance.strength.astype(np.float32))
    save_npy("modality_drop.npy", res.dominance.drop.astype(np.float32))
    for m, prof in res.layer_profiles.items():
        save_npy(f"layer_attention_{m}.npy", prof.astype(np.float32))
    summary = {
        "subjects": res.subjects,
        "modalities": res.modalities,
        "subject_r": dict(zip(res.subjects, map(float, res.subject_r))),
        "subset_r": res.subset_r,
        "dominant_counts": {m: int((res.dominance.dominant == i).sum()) for i, m in enumerate(res.modalities)},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    files.append(out / "summary.json")

    fig, ax = plt.subplots(figsize=(6, 3))
    for s, sub in enumerate(res.subjects):
        ax.plot(np.sort(res.val_r[s])[::-1], label=sub)
    ax.set(xlabel="parcel (sorted)", ylabel="validation r", title="Per-parcel validation r")
    ax.legend(fontsize=7)
    save_fig(fig, "val_r.png")

    fig, ax = plt.subplots(figsize=(4, 3))
    ax.bar(res.subjects, res.subject_r)
    ax.set(ylabel="mean r", title="Per-subject validation r")
    save_fig(fig, "subject_r.png")

    fig, ax = plt.subplots(figsize=(6, 3))
    names = list(res.subset_r)
    ax.bar(range(len(names)), [res.subset_r[n] for n in names])
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
    ax.set(ylabel="mean r", title="Modality subsets")
    save_fig(fig, "subset_r.png")

    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    counts = [int((res.dominance.dominant == i).sum()) for i in range(len(res.modalities))]
    axes[0].bar(res.modalities, counts)
    axes[0].set(ylabel="parcels", title="Dominant modality")
    for i, m in enumerate(res.modalities):
        sel = res.dominance.dominant == i
        if sel.any():
            axes[1].hist(res.dominance.strength[sel], bins=10, range=(0, 1), alpha=0.5, label=m)
    axes[1].set(xlabel="dominance strength", title="Strength")
    axes[1].legend(fontsize=7)
    save_fig(fig, "dominance.png")

    if res.layer_profiles:
        fig, ax = plt.subplots(figsize=(6, 3))
        for m, prof in res.layer_profiles.items():
            ax.plot(np.arange(len(prof)), prof, marker="o", label=m)
        ax.set(xlabel="backbone layer (selected index)", ylabel="attention", title="Layer attention profile")
        ax.legend(fontsize=7)
        save_fig(fig, "layer_attention.png")
    return files
