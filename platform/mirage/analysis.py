"""Interpretability of a trained model: the paper's figures as arrays and PNG plots.

- layer attention profile per modality, averaged over heads and queries, and per head and per
  query with each profile's distance from uniform and its spread over seeds (Fig. 4);
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
from collections.abc import Callable, Iterable, Sequence
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
    return attention_views(attn).mean


@dataclass
class AttentionViews:
    """Layer attention of one modality, averaged over windows and frames (Fig. 4).

    ``mean`` (L,) over heads and queries; ``per_head`` (heads, L); ``per_query`` (Q, L);
    ``per_head_query`` (heads, Q, L). Every profile sums to 1 over the layers.
    """

    mean: np.ndarray
    per_head: np.ndarray
    per_query: np.ndarray
    per_head_query: np.ndarray

    @property
    def n_layers(self) -> int:
        return int(self.mean.shape[-1])

    @classmethod
    def from_head_query(cls, hq: np.ndarray) -> "AttentionViews":
        """The views of a (heads, Q, L) profile (each row summing to 1 over L)."""
        hq = np.asarray(hq, dtype=np.float64)
        return cls(hq.mean(axis=(0, 1)), hq.mean(axis=1), hq.mean(axis=0), hq)


def attention_views(attn: Iterable[np.ndarray]) -> AttentionViews:
    """Per-head and per-query layer profiles of one modality.

    Args:
        attn: batches of attention weights, each (B, T, heads, Q, L) (softmax over L), as
            :meth:`mirage.predictor.Predictor.layer_attention` gives them per modality.
    """
    total, count = None, 0
    for a in attn:
        a = np.asarray(a, dtype=np.float64)
        if a.ndim != 5:
            raise ValueError(f"attention_views: expected batches (B, T, heads, Q, L), got shape {a.shape}")
        s = a.sum(axis=(0, 1))  # (heads, Q, L)
        total = s if total is None else total + s
        count += a.shape[0] * a.shape[1]
    if total is None or count == 0:
        raise ValueError("attention_views: no attention batches given")
    return AttentionViews.from_head_query(total / count)  # (heads, Q, L)


def distance_from_uniform(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """``1 - H(p) / log(n_layers)`` along ``axis``: 0 for a flat profile, 1 for attention on one layer.

    ``p`` is normalised along ``axis`` first (non-negative weights); one layer gives 0.
    """
    p = np.asarray(p, dtype=np.float64)
    if (p < 0).any():
        raise ValueError("distance_from_uniform: attention weights must be non-negative")
    n = p.shape[axis]
    if n < 2:
        return np.zeros(np.delete(p.shape, axis % p.ndim)) if p.ndim > 1 else np.float64(0.0)
    q = p / p.sum(axis=axis, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(q > 0, q * np.log(q), 0.0).sum(axis=axis)
    return np.clip(1.0 - h / np.log(n), 0.0, 1.0)


def view_distances(views: AttentionViews) -> dict[str, np.ndarray]:
    """Distance from uniform of every profile: ``mean`` (), ``per_head`` (heads,), ``per_query`` (Q,),
    ``per_head_query`` (heads, Q)."""
    return {
        "mean": distance_from_uniform(views.mean),
        "per_head": distance_from_uniform(views.per_head),
        "per_query": distance_from_uniform(views.per_query),
        "per_head_query": distance_from_uniform(views.per_head_query),
    }


def seed_spread(values: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation over seeds of equally shaped profiles or distances (ddof 0)."""
    if not values:
        raise ValueError("seed_spread: no profiles given")
    shapes = {np.shape(v) for v in values}
    if len(shapes) != 1:
        raise ValueError(f"seed_spread: profiles differ in shape {sorted(shapes)}; expected one shape for every seed")
    arr = np.stack([np.asarray(v, dtype=np.float64) for v in values])
    return arr.mean(axis=0), arr.std(axis=0)


@dataclass
class AttentionSpread:
    """One modality's layer attention over seeds: mean and std of the profiles and of their distances."""

    n_seeds: int
    profile_mean: np.ndarray  # (L,)
    profile_std: np.ndarray  # (L,)
    distance_mean: float
    distance_std: float
    per_head_distance_mean: np.ndarray  # (heads,)
    per_head_distance_std: np.ndarray  # (heads,)

    def to_json(self) -> dict:
        return {
            "n_seeds": self.n_seeds,
            "profile_mean": self.profile_mean.tolist(), "profile_std": self.profile_std.tolist(),
            "distance_mean": self.distance_mean, "distance_std": self.distance_std,
            "per_head_distance_mean": self.per_head_distance_mean.tolist(),
            "per_head_distance_std": self.per_head_distance_std.tolist(),
        }


def attention_spread(per_seed: Sequence[dict[str, AttentionViews]]) -> dict[str, AttentionSpread]:
    """Spread over seeds (one modality -> views mapping per trained model) for every modality all of them have."""
    if not per_seed:
        raise ValueError("attention_spread: no models given")
    out = {}
    for m in [m for m in per_seed[0] if all(m in v for v in per_seed)]:
        views = [v[m] for v in per_seed]
        pm, ps = seed_spread([v.mean for v in views])
        dm, ds = seed_spread([distance_from_uniform(v.mean) for v in views])
        hm, hs = seed_spread([distance_from_uniform(v.per_head) for v in views])
        out[m] = AttentionSpread(len(views), pm, ps, float(dm), float(ds), hm, hs)
    return out


def write_attention_views(
    views: dict[str, AttentionViews],
    out_dir: str | Path,
    spread: dict[str, AttentionSpread] | None = None,
    on_figure: FigureHook | None = None,
) -> list[Path]:
    """Per-head and per-query profiles with their distances from uniform, as arrays, JSON and plots.

    Writes ``attention_<m>_{mean,per_head,per_query}.npy``, ``attention_distance.json`` (modality ->
    distances of every view, and the seed spread when given), ``attention_<m>.png`` (per-head
    profiles and the query x layer map, the uniform level drawn) and ``attention_spread.png``;
    ``on_figure(name, fig)`` sees every plot before it is closed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    summary: dict[str, dict] = {}
    for m, v in views.items():
        for name in ("mean", "per_head", "per_query"):
            np.save(out / f"attention_{m}_{name}.npy", getattr(v, name).astype(np.float32))
            files.append(out / f"attention_{m}_{name}.npy")
        d = view_distances(v)
        summary[m] = {k: np.asarray(x).tolist() for k, x in d.items()}
        fig, axes = plt.subplots(1, 2, figsize=(9, 3))
        layers = np.arange(v.n_layers)
        for h, prof in enumerate(v.per_head):
            axes[0].plot(layers, prof, marker=".", label=f"head {h} (d={d['per_head'][h]:.2f})")
        axes[0].plot(layers, v.mean, color="k", lw=2, label=f"mean (d={float(d['mean']):.2f})")
        axes[0].axhline(1.0 / v.n_layers, color="grey", ls="--", lw=1, label="uniform")
        axes[0].set(xlabel="layer (selected index)", ylabel="attention", title=f"{m}: per head")
        axes[0].legend(fontsize=6)
        im = axes[1].imshow(v.per_query, aspect="auto", cmap="viridis")
        axes[1].set(xlabel="layer (selected index)", ylabel="query", title=f"{m}: per query")
        fig.colorbar(im, ax=axes[1])
        files.append(finish_figure(fig, out / f"attention_{m}.png", on_figure))
    if spread:
        for m, sp in spread.items():
            summary.setdefault(m, {})["spread"] = sp.to_json()
        fig, ax = plt.subplots(figsize=(6, 3))
        for m, sp in spread.items():
            x = np.arange(len(sp.profile_mean))
            ax.plot(x, sp.profile_mean, marker="o",
                    label=f"{m} (d={sp.distance_mean:.2f}±{sp.distance_std:.2f}, {sp.n_seeds} seeds)")
            ax.fill_between(x, sp.profile_mean - sp.profile_std, sp.profile_mean + sp.profile_std, alpha=0.2)
            ax.axhline(1.0 / len(x), color="grey", ls="--", lw=1)
        ax.set(xlabel="layer (selected index)", ylabel="attention", title="Layer attention over seeds (d: distance from uniform)")
        ax.legend(fontsize=7)
        files.append(finish_figure(fig, out / "attention_spread.png", on_figure))
    (out / "attention_distance.json").write_text(json.dumps(summary, indent=2))
    files.append(out / "attention_distance.json")
    return files


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


FigureHook = Callable[[str, object], None]
"""Called with (figure name, matplotlib figure) for every plot before it is closed (e.g. to log it to MLflow)."""


def finish_figure(fig, path: Path, on_figure: FigureHook | None = None) -> Path:
    """Lay out ``fig``, save it as a PNG at ``path`` (100 dpi), show it to ``on_figure`` (named by the
    file stem), close it; returns ``path``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    if on_figure is not None:
        on_figure(path.stem, fig)
    plt.close(fig)
    return path


def write_analysis(res: AnalysisResult, out_dir: str | Path, on_figure: FigureHook | None = None) -> list[Path]:
    """Write the arrays (.npy, summary.json) and the plots (.png); returns the files written.

    ``on_figure(name, fig)`` sees every plot (``name`` = its file stem) before it is closed.
    """
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
        files.append(finish_figure(fig, out / name, on_figure))

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
