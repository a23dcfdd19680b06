"""The tables and figures of an experiment, computed from its trials' scores alone.

Input: one :class:`TrialRecord` per scored child run (its table row, method, grid point, seed and
:class:`mirage.experiments.scoring.Scores`) and the context the experiment logged (subjects, TR,
noise ceiling, atlas). Nothing here reads the dataset or a model, so a report recomputed in a fresh
process from MLflow gives the same numbers.

Table (:func:`experiment_table`): one row per (table row, split). A row's r for a subject is the
mean over its seeds of the subject's mean r over parcels; ``mean_r`` is the mean over subjects and
``sem`` the standard error over subjects (std with ddof 1 / sqrt(n); 0 for one subject). Where a
noise ceiling exists, ``mean_r_norm`` / ``sem_norm`` do the same on the ceiling-normalised r
(:func:`mirage.brain.ceiling.normalise`: parcels whose ceiling is below the minimum left out).
Figures (:func:`experiment_figures`) are matplotlib figures keyed ``<figure>/<name>``. Core: no
Ray, no MLflow.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mirage.experiments.scoring import Scores
from mirage.experiments.spec import ExperimentSpec, short_key
from mirage.metrics import noise_ceiling_normalized, sem

TABLE_NUMBERS = ("mean_r", "sem", "mean_r_norm", "sem_norm")


@dataclass
class TrialRecord:
    """One scored trial (or seed ensemble) as the report sees it.

    Attributes:
        run_id: its MLflow run; ``key``: trial key; ``group``: the table row it belongs to.
        method: method name (``mirage+ensemble`` for a seed ensemble); ``kind``: trial, baseline, ensemble.
        point: grid key -> value label; ``seed``: train.seed ("" for baselines and ensembles).
    """

    run_id: str
    key: str
    group: str
    method: str
    kind: str
    point: dict[str, str]
    seed: str
    scores: Scores


@dataclass
class Context:
    """What the report needs beyond the scores, logged once on the parent run.

    Attributes:
        subjects: subject ids; ``n_parcels``; ``tr``: seconds per fMRI sample.
        ceiling: (n_parcels,) noise ceiling or None; ``ceiling_source``: where it came from.
        min_ceiling: parcels below it get no normalised r.
        atlas: a nibabel image of the parcellation, or None (no brain maps then).
    """

    subjects: list[str]
    n_parcels: int
    tr: float
    ceiling: np.ndarray | None = None
    ceiling_source: str = ""
    min_ceiling: float = 0.1
    atlas: Any = None


@dataclass
class Report:
    """An experiment's table rows, its figures and what it could not draw."""

    rows: list[dict[str, Any]]
    figures: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    network_rows: list[dict[str, Any]] = field(default_factory=list)
    probe_rows: list[dict[str, Any]] = field(default_factory=list)
    attention_rows: list[dict[str, Any]] = field(default_factory=list)


# ------------------------------------------------------------------- numbers


def groups_in_order(records: Sequence[TrialRecord]) -> dict[str, list[TrialRecord]]:
    """Table row -> its records, rows in the order their first record came."""
    out: dict[str, list[TrialRecord]] = {}
    for r in records:
        out.setdefault(r.group, []).append(r)
    return out


def parcel_r(records: Sequence[TrialRecord], split: str, subjects: Sequence[str]) -> dict[str, np.ndarray]:
    """Subject -> (n_parcels,) r of a table row on ``split``, the mean over its seeds (subjects without data left out)."""
    out: dict[str, np.ndarray] = {}
    for i, s in enumerate(subjects):
        rows = []
        for rec in records:
            sc = rec.scores
            if split in sc.r and s in sc.subjects:
                row = sc.r[split][sc.subjects.index(s)]
                if np.isfinite(row).any():
                    rows.append(row)
        if rows:
            out[s] = np.mean(np.stack(rows), axis=0)
    return out


def _normalised(r: np.ndarray, ctx: Context) -> np.ndarray | None:
    if ctx.ceiling is None:
        return None
    return noise_ceiling_normalized(r, ctx.ceiling, ctx.min_ceiling)


def experiment_table(spec: ExperimentSpec, records: Sequence[TrialRecord], ctx: Context) -> list[dict[str, Any]]:
    """One row per (table row, split scored): method, grid values, split, n_seeds, n_subjects, mean_r,
    sem, mean_r_norm, sem_norm (NaN without a ceiling), and r per subject (``r/<subject>``)."""
    rows = []
    for group, recs in groups_in_order(records).items():
        first = recs[0]
        for split in spec.splits:
            per = parcel_r(recs, split, ctx.subjects)
            if not per:
                continue
            subj = {s: float(np.nanmean(v)) for s, v in per.items()}
            norm = {s: _normalised(v, ctx) for s, v in per.items()}
            nm = np.array([float(np.nanmean(v)) for v in norm.values() if v is not None and np.isfinite(v).any()])
            vals = np.array(list(subj.values()))
            row: dict[str, Any] = {"row": group, "method": first.method, "kind": first.kind}
            row.update({short_key(k): first.point.get(k, "") for k in spec.grid})
            row.update({
                "split": split, "n_seeds": len({r.seed for r in recs}), "n_subjects": len(vals),
                "mean_r": float(vals.mean()), "sem": sem(vals),
                "mean_r_norm": float(nm.mean()) if len(nm) else float("nan"),
                "sem_norm": sem(nm) if len(nm) else float("nan"),
            })
            row.update({f"r/{s}": v for s, v in subj.items()})
            rows.append(row)
    return rows


def table_csv(rows: Sequence[dict[str, Any]]) -> str:
    """The table as CSV text (columns: the union of the rows' keys, first-seen order)."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def metric_name(text: str) -> str:
    """``text`` as an MLflow metric-name part (letters, digits, ``_ - . /`` and spaces kept, others ``_``)."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", text)


def row_metrics(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Table row -> its numbers as metrics (``<split>/mean_r``, ``<split>/sem``, ...; NaN left out)."""
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        m = out.setdefault(r["row"], {})
        for k in TABLE_NUMBERS:
            v = r[k]
            if isinstance(v, float) and np.isfinite(v):
                m[f"table/{r['split']}/{k}"] = v
    return out


def best_group(rows: Sequence[dict[str, Any]], split: str = "val", kinds: Sequence[str] = ("trial", "ensemble")) -> str | None:
    """The row with the highest mean r on ``split`` among ``kinds`` (models first), else any row."""
    cand = [r for r in rows if r["split"] == split and r["kind"] in kinds] or [r for r in rows if r["split"] == split]
    return max(cand, key=lambda r: r["mean_r"])["row"] if cand else None


# ------------------------------------------------------------------- figures


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "row"


def bars_figure(rows: Sequence[dict[str, Any]], split: str, title: str):
    """Mean r per table row on ``split`` with SEM over subjects; ceiling-normalised r beside it where it exists."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = [r for r in rows if r["split"] == split]
    x = np.arange(len(sel))
    has_norm = any(np.isfinite(r["mean_r_norm"]) for r in sel)
    width = 0.4 if has_norm else 0.7
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(sel) + 2), 4.0))
    ax.bar(x - (width / 2 if has_norm else 0), [r["mean_r"] for r in sel], width,
           yerr=[r["sem"] for r in sel], capsize=3, label="r")
    if has_norm:
        ax.bar(x + width / 2, [r["mean_r_norm"] for r in sel], width, yerr=[r["sem_norm"] for r in sel],
               capsize=3, label="r / noise ceiling", alpha=0.7)
        ax.legend(fontsize=8)
    one_method = len({r["method"] for r in sel}) == 1
    labels = [r["row"].split("|", 1)[-1] if one_method else r["row"] for r in sel]
    ax.set_xticks(x, labels, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel(f"mean r ± SEM over subjects ({split})")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_title(title + (f" ({sel[0]['method']})" if one_method else ""), fontsize=10)
    fig.tight_layout()
    return fig


def experiment_figures(spec: ExperimentSpec, records: Sequence[TrialRecord], rows: Sequence[dict[str, Any]],
                       ctx: Context) -> Report:
    """Every figure ``spec.report.figures`` asks for that the scores and context allow; the others named in notes."""
    rep = Report(rows=list(rows))
    groups = groups_in_order(records)
    missing = sorted({m for r in records for m in r.scores.missing})
    if missing:
        rep.notes.append(f"no fMRI in the dataset for split(s) {', '.join(missing)}: not scored")
    want = set(spec.report.figures)
    if "bars" in want:
        for split in spec.splits:
            if any(r["split"] == split for r in rows):
                rep.figures[f"bars/{split}"] = bars_figure(rows, split, f"{spec.name}: mean r per row ({split})")
    best = best_group(rows)
    maps_ok = ctx.atlas is not None
    if not maps_ok and want & {"maps", "difference"}:
        rep.notes.append("no atlas in the dataset: brain maps skipped")
    if "maps" in want and maps_ok and best is not None:
        _maps(rep, spec, groups[best], best, ctx)
    if "networks" in want:
        _networks(rep, spec, groups, best, ctx)
    if "difference" in want and maps_ok:
        _difference(rep, spec, groups, ctx)
    if "timecourses" in want and best is not None:
        _timecourses(rep, groups[best], best, ctx)
    if "probes" in want:
        _probes(rep, spec, groups, ctx)
    if "attention" in want:
        _attention(rep, spec, groups)
    if "dominance" in want and maps_ok:
        _dominance(rep, spec, groups, ctx)
    return rep


MODALITIES_KEY = "model.modalities"


def _dominance(rep: Report, spec: ExperimentSpec, groups: dict[str, list[TrialRecord]], ctx: Context) -> None:
    """Per parcel, the modality whose single-modality model has the highest r (mean over subjects), saturation by it."""
    from mirage.brain.maps import plot_dominant_modality

    single: dict[str, np.ndarray] = {}
    for g, recs in groups.items():
        label = recs[0].point.get(MODALITIES_KEY, "")
        if label and "+" not in label and recs[0].kind != "baseline" and label not in single:
            per = parcel_r(recs, "val", ctx.subjects)
            if per:
                single[label] = np.mean(np.stack(list(per.values())), axis=0)
    if len(single) < 2:
        rep.notes.append(f"dominance needs models trained on single modalities (a grid over {MODALITIES_KEY}): skipped")
        return
    for view in spec.report.map_views:
        rep.figures[f"dominance/single_modality_{view}"] = plot_dominant_modality(
            single, ctx.atlas, title=f"{spec.name}: best single-modality model per parcel (val)", view=view
        )


def _attention(rep: Report, spec: ExperimentSpec, groups: dict[str, list[TrialRecord]]) -> None:
    """Per table row: each modality's layer profile, mean and std over seeds, with its distance from
    uniform (1 - entropy / log(n_layers); 0 = flat) and that distance per head."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mirage.analysis import AttentionViews, attention_spread

    for g, recs in groups.items():
        per_seed = []
        for r in recs:
            if r.scores.attention:
                per_seed.append({m: AttentionViews.from_head_query(a) for m, a in r.scores.attention.items()})
        if not per_seed:
            continue
        spread = attention_spread(per_seed)
        fig, axes = plt.subplots(1, len(spread), figsize=(3.6 * len(spread), 3.2), squeeze=False)
        for ax, (m, sp) in zip(axes[0], spread.items()):
            x = np.arange(len(sp.profile_mean))
            ax.plot(x, sp.profile_mean, marker="o", ms=3)
            ax.fill_between(x, sp.profile_mean - sp.profile_std, sp.profile_mean + sp.profile_std, alpha=0.3)
            ax.axhline(1.0 / len(x), color="k", lw=0.6, ls="--", label="uniform")
            ax.set_title(f"{m}: distance {sp.distance_mean:.3f} ± {sp.distance_std:.3f}", fontsize=9)
            ax.set_xlabel("backbone layer")
            rep.attention_rows.append({
                "row": g, "modality": m, "n_seeds": sp.n_seeds, "distance_mean": sp.distance_mean,
                "distance_std": sp.distance_std,
                **{f"head{h}_distance": float(v) for h, v in enumerate(sp.per_head_distance_mean)},
            })
        axes[0][0].set_ylabel("attention weight (mean ± std over seeds)")
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"{spec.name} {g}: layer attention (0 = flat profile)", fontsize=10)
        fig.tight_layout()
        rep.figures[f"attention/{_slug(g)}"] = fig
    if not rep.attention_rows:
        rep.notes.append("no layer attention in the trials (only cross_attention models have it): attention skipped")


def probe_table(groups: dict[str, list[TrialRecord]], subjects: Sequence[str]) -> list[dict[str, Any]]:
    """One row per (table row, probed stage): mean over subjects of the subject's mean probe r (seeds
    averaged), SEM over subjects, and r per subject (``r/<subject>``)."""
    out = []
    for g, recs in groups.items():
        stages = list(dict.fromkeys(st for r in recs for st in r.scores.probes))
        for st in stages:
            subj = {}
            for s in subjects:
                vals = [float(np.nanmean(r.scores.probes[st][r.scores.subjects.index(s)])) for r in recs
                        if st in r.scores.probes and s in r.scores.subjects
                        and np.isfinite(r.scores.probes[st][r.scores.subjects.index(s)]).any()]
                if vals:
                    subj[s] = float(np.mean(vals))
            if subj:
                v = np.array(list(subj.values()))
                out.append({"row": g, "stage": st, "n_subjects": len(v), "mean_r": float(v.mean()), "sem": sem(v),
                            **{f"r/{s}": x for s, x in subj.items()}})
    return out


def _probes(rep: Report, spec: ExperimentSpec, groups: dict[str, list[TrialRecord]], ctx: Context) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rep.probe_rows = probe_table(groups, ctx.subjects)
    if not rep.probe_rows:
        rep.notes.append("no probe scores in the trials: probes figure skipped")
        return
    names = list(dict.fromkeys(r["row"] for r in rep.probe_rows))
    stages = list(dict.fromkeys(r["stage"] for r in rep.probe_rows))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.4 * len(stages) + 1), 3.6))
    for j, g in enumerate(names):
        by = {r["stage"]: r for r in rep.probe_rows if r["row"] == g}
        x = np.arange(len(stages)) + (j - (len(names) - 1) / 2) * width
        ax.bar(x, [by[s]["mean_r"] if s in by else np.nan for s in stages], width,
               yerr=[by[s]["sem"] if s in by else 0 for s in stages], capsize=3, label=g)
    ax.set_xticks(np.arange(len(stages)), stages)
    ax.set_ylabel("probe r (held-out runs), SEM over subjects")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_title(f"{spec.name}: linear probes per stage (val)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    rep.figures["probes/val"] = fig


def _maps(rep: Report, spec: ExperimentSpec, recs: list[TrialRecord], group: str, ctx: Context) -> None:
    from mirage.brain.maps import plot_parcel_map

    per = parcel_r(recs, "val", ctx.subjects)
    if not per:
        return
    maps = {**per, "mean": np.mean(np.stack(list(per.values())), axis=0)}
    if ctx.ceiling is not None:
        maps["mean_normalised"] = _normalised(maps["mean"], ctx)
    for name, values in maps.items():
        what = "r / noise ceiling" if name == "mean_normalised" else "r"
        for view in spec.report.map_views:
            rep.figures[f"maps/{_slug(group)}_{name}_{view}"] = plot_parcel_map(
                np.nan_to_num(values), ctx.atlas, title=f"{group}: {what} ({name}, val)", view=view
            )


def _compare_groups(spec: ExperimentSpec, groups: dict[str, list[TrialRecord]]) -> list[tuple[str, str]]:
    """(group of method a, group of method b) at each grid point both have."""
    if not spec.report.compare:
        return []
    a, b = spec.report.compare
    by_point: dict[tuple, dict[str, str]] = {}
    for g, recs in groups.items():
        by_point.setdefault(tuple(sorted(recs[0].point.items())), {})[recs[0].method] = g
    return [(m[a], m[b]) for m in by_point.values() if a in m and b in m]


def _networks(rep: Report, spec: ExperimentSpec, groups: dict[str, list[TrialRecord]], best: str | None,
              ctx: Context) -> None:
    from mirage.brain.networks import network_summary, plot_network_bars

    pairs = _compare_groups(spec, groups)
    shown = list(pairs[0]) if pairs else ([best] if best else [])
    r = {g: parcel_r(groups[g], "val", ctx.subjects) for g in shown}
    r = {g: v for g, v in r.items() if v}
    if not r:
        return
    rep.network_rows = network_summary(r, ctx.n_parcels)
    rep.figures["networks/val"] = plot_network_bars(rep.network_rows, title=f"{spec.name}: mean r per Yeo-7 network (val)")


def _difference(rep: Report, spec: ExperimentSpec, groups: dict[str, list[TrialRecord]], ctx: Context) -> None:
    from mirage.brain.maps import plot_parcel_map

    for ga, gb in _compare_groups(spec, groups):
        ra, rb = parcel_r(groups[ga], "val", ctx.subjects), parcel_r(groups[gb], "val", ctx.subjects)
        common = [s for s in ra if s in rb]
        if not common:
            continue
        diff = np.mean(np.stack([ra[s] - rb[s] for s in common]), axis=0)
        for view in spec.report.map_views:
            rep.figures[f"difference/{_slug(ga)}_minus_{_slug(gb)}_{view}"] = plot_parcel_map(
                np.nan_to_num(diff), ctx.atlas, title=f"r: {ga} minus {gb} (val, mean over subjects)",
                view=view, symmetric=True,
            )


def _timecourses(rep: Report, recs: list[TrialRecord], group: str, ctx: Context) -> None:
    from mirage.brain.networks import parcel_labels, parcel_networks
    from mirage.brain.timecourses import choose_parcels, plot_time_courses

    rec = next((r for r in recs if r.scores.timecourses), None)
    if rec is None:
        return
    sc = rec.scores
    nets, labels = parcel_networks(ctx.n_parcels), parcel_labels(ctx.n_parcels)
    for s, tc in sc.timecourses.items():
        if "val" not in sc.r or s not in sc.subjects:
            continue
        parcels = choose_parcels(sc.r["val"][sc.subjects.index(s)], nets)
        rep.figures[f"timecourses/{_slug(group)}_{s}"] = plot_time_courses(
            tc["measured"], tc["predicted"], parcels, ctx.tr, title=f"{group}, {s}, {tc['run']}: measured vs predicted",
            labels=labels,
        )
