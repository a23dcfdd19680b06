"""Measured vs predicted fMRI time courses for a few chosen parcels (best, median, best of each network)."""

from __future__ import annotations

import numpy as np

from mirage.brain.networks import NETWORKS
from mirage.errors import DataError


def choose_parcels(r, networks) -> dict[str, int]:
    """Parcels worth looking at, by their validation r.

    Args:
        r: (P,) per-parcel r (NaN = not evaluated).
        networks: (P,) network name of every parcel (``parcel_networks(P)``).

    Returns:
        {'best': parcel with the highest r, 'median': parcel whose r is closest to the median r,
        '<network>': the best parcel of that network, ...} in that order, networks in NETWORKS order
        (networks without a finite r are left out). Values are 0-based parcel indices.
    """
    r = np.asarray(r, dtype=np.float64)
    networks = np.asarray(networks)
    if r.ndim != 1 or networks.shape != r.shape:
        raise DataError(f"choose_parcels: r {r.shape} and networks {networks.shape}; expected two (P,) arrays")
    ok = np.isfinite(r)
    if not ok.any():
        raise DataError("choose_parcels: r has no finite value; expected per-parcel correlations")
    masked = np.where(ok, r, -np.inf)
    out = {"best": int(np.argmax(masked)),
           "median": int(np.argmin(np.where(ok, np.abs(r - np.median(r[ok])), np.inf)))}
    for net in NETWORKS:
        sel = ok & (networks == net)
        if sel.any():
            out[net] = int(np.argmax(np.where(sel, r, -np.inf)))
    return out


def _z(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / (x.std() if x.std() > 0 else 1.0)


def plot_time_courses(measured, predicted, parcels: dict[str, int], tr: float, title: str = "",
                      labels: list[str] | None = None):
    """One row per chosen parcel: measured and predicted fMRI over time, each z-scored, r in the row title.

    Args:
        measured: (T, P) fMRI of one run (or validation runs concatenated).
        predicted: (T, P) the model's prediction of it.
        parcels: row name -> parcel index (``choose_parcels``).
        tr: seconds per TR (x axis in seconds).
        labels: (P,) parcel names for the row titles (``parcel_labels(P)``); default 'parcel <i>'.

    Returns a matplotlib Figure.
    """
    from matplotlib.figure import Figure

    y, p = np.asarray(measured, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    if y.ndim != 2 or y.shape != p.shape:
        raise DataError(f"plot_time_courses: measured {y.shape} and predicted {p.shape}; expected two (T, P) arrays")
    if not parcels:
        raise DataError("plot_time_courses: no parcel chosen; expected at least one (choose_parcels)")
    bad = {k: i for k, i in parcels.items() if not 0 <= i < y.shape[1]}
    if bad:
        raise DataError(f"plot_time_courses: parcels {bad} out of range; expected indices in [0, {y.shape[1]})")
    t = np.arange(y.shape[0]) * tr
    fig = Figure(figsize=(10, 1.6 * len(parcels) + 0.8))
    axes = fig.subplots(len(parcels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (name, i) in zip(axes, parcels.items()):
        r = float(np.corrcoef(y[:, i], p[:, i])[0, 1]) if y[:, i].std() > 0 and p[:, i].std() > 0 else float("nan")
        ax.plot(t, _z(y[:, i]), color="black", lw=1.0, label="measured")
        ax.plot(t, _z(p[:, i]), color="tab:red", lw=1.0, label="predicted")
        who = labels[i] if labels is not None else f"parcel {i}"
        ax.set_title(f"{name}: {who} (r = {r:.2f})", fontsize="small", loc="left")
        ax.set_ylabel("z", fontsize="small")
    axes[0].legend(loc="upper right", fontsize="x-small", ncol=2)
    axes[-1].set_xlabel("time (s)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
