"""Yeo-7 network of every Schaefer parcel, and mean r per network over subjects.

The label table is package data (``data/schaefer2018_1000parcels_7networks.tsv``): the Schaefer 2018
1000-parcel 7-network label order, from ThomasYeoLab/CBIG (commit
c4034588d99b80c5cabf7fc1071c5766e4688ce9,
``stable_projects/brain_parcellation/Schaefer2018_LocalGlobal/Parcellations/MNI/Schaefer2018_1000Parcels_7Networks_order.txt``);
see ``data/README.md``. Row k (1-based) is atlas label k; parcel index i (0-based, the column of an
fMRI sample) is label i + 1. Labels 1-500 are the left hemisphere, 501-1000 the right.

Other parcel counts (synthetic datasets): parcel i of P takes the table row
``floor((i + 0.5) * 1000 / P)`` (0-based), so the networks keep their order and proportions and the
first half of the parcels is the left hemisphere. P = 1000 is the table itself.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

import numpy as np

from mirage.errors import DataError
from mirage.metrics import sem

NETWORKS = ("Vis", "SomMot", "DorsAttn", "SalVentAttn", "Limbic", "Cont", "Default")
"""The Yeo 2011 7 networks, in the order of the Schaefer label table."""
TABLE = "schaefer2018_1000parcels_7networks.tsv"
N_TABLE = 1000


@lru_cache(maxsize=1)
def _table() -> tuple[str, ...]:
    text = resources.files("mirage.brain").joinpath("data", TABLE).read_text()
    lines = text.splitlines()
    if not lines or lines[0].split("\t") != ["label", "name"]:
        raise DataError(f"mirage/brain/data/{TABLE}: expected a 'label<TAB>name' header")
    names: list[str] = []
    for k, line in enumerate(lines[1:], start=1):
        label, name = line.split("\t")
        if int(label) != k:
            raise DataError(f"mirage/brain/data/{TABLE}: row {k} has label {label}, expected {k}")
        names.append(name)
    if len(names) != N_TABLE:
        raise DataError(f"mirage/brain/data/{TABLE}: {len(names)} rows, expected {N_TABLE}")
    return tuple(names)


def _rows(n_parcels: int) -> np.ndarray:
    """Table row (0-based) of every parcel: (P,) int."""
    if n_parcels < 1:
        raise DataError(f"n_parcels = {n_parcels}: expected a positive number of parcels")
    return np.floor((np.arange(n_parcels) + 0.5) * N_TABLE / n_parcels).astype(np.int64)


def parcel_labels(n_parcels: int) -> list[str]:
    """Schaefer name of every parcel (``7Networks_LH_Vis_1``...): list of length P."""
    names = _table()
    return [names[r] for r in _rows(n_parcels)]


def parcel_networks(n_parcels: int) -> np.ndarray:
    """Yeo-7 network of every parcel: (P,) str, values in NETWORKS."""
    return np.array([n.split("_")[2] for n in parcel_labels(n_parcels)])


def parcel_hemispheres(n_parcels: int) -> np.ndarray:
    """Hemisphere of every parcel: (P,) str, 'LH' or 'RH'."""
    return np.array([n.split("_")[1] for n in parcel_labels(n_parcels)])


def network_summary(r: dict[str, dict[str, np.ndarray]], n_parcels: int) -> list[dict]:
    """Mean r per Yeo-7 network with its SEM over subjects, for every model.

    Args:
        r: model name -> subject -> per-parcel r, (P,) each; NaN parcels are left out.
        n_parcels: P.

    Returns:
        One row per (model, network), models in ``r`` order, networks in NETWORKS order:
        ``{"model", "network", "mean_r", "sem", "n_subjects", "n_parcels"}``. ``mean_r`` is the mean
        over subjects of each subject's mean r over the network's parcels; ``sem`` is the standard
        deviation over subjects (ddof 1) / sqrt(n_subjects), 0.0 for a single subject; a network
        with no parcel (tiny P) or no finite r has mean_r NaN.

    Raises:
        DataError: an array that is not (P,).
    """
    networks = parcel_networks(n_parcels)
    rows: list[dict] = []
    for model, by_subject in r.items():
        per_subject = []
        for subject, values in by_subject.items():
            v = np.asarray(values, dtype=np.float64)
            if v.shape != (n_parcels,):
                raise DataError(f"r[{model!r}][{subject!r}]: shape {v.shape}, expected ({n_parcels},)")
            per_subject.append(v)
        stack = np.stack(per_subject) if per_subject else np.zeros((0, n_parcels))  # (S, P)
        for net in NETWORKS:
            sel = networks == net
            means = np.array([np.nanmean(s[sel]) if np.isfinite(s[sel]).any() else np.nan for s in stack])
            means = means[np.isfinite(means)]
            n = len(means)
            rows.append({
                "model": model, "network": net,
                "mean_r": float(means.mean()) if n else float("nan"),
                "sem": sem(means),
                "n_subjects": n, "n_parcels": int(sel.sum()),
            })
    return rows


def top_network(rows: list[dict], model: str) -> str:
    """The network with the highest mean_r for ``model`` in ``network_summary`` rows."""
    mine = [row for row in rows if row["model"] == model and np.isfinite(row["mean_r"])]
    if not mine:
        raise DataError(f"network summary: no finite row for model {model!r}")
    return max(mine, key=lambda row: row["mean_r"])["network"]


def plot_network_bars(rows: list[dict], title: str = ""):
    """Grouped bar chart of ``network_summary`` rows: networks on x, one bar per model, SEM error bars.

    Returns a matplotlib Figure (the caller saves and closes it).
    """
    from matplotlib.figure import Figure

    models = list(dict.fromkeys(row["model"] for row in rows))
    table = {(row["model"], row["network"]): row for row in rows}
    fig = Figure(figsize=(max(6.0, 1.1 * len(NETWORKS) * max(1, len(models)) ** 0.5 + 2), 4.0))
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(models))
    x = np.arange(len(NETWORKS))
    for k, model in enumerate(models):
        got = [table.get((model, net)) for net in NETWORKS]
        mean = [g["mean_r"] if g else np.nan for g in got]
        sem = [g["sem"] if g else 0.0 for g in got]
        ax.bar(x + (k - (len(models) - 1) / 2) * width, mean, width, yerr=sem, capsize=2, label=model)
    ax.set_xticks(x, NETWORKS)
    ax.set_ylabel("mean r (SEM over subjects)")
    ax.axhline(0.0, color="black", lw=0.5)
    if title:
        ax.set_title(title)
    if len(models) > 1:
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig
