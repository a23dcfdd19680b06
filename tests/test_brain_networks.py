"""The Schaefer 2018 1000-parcel 7-network label table, the rule for other parcel counts, and the network summary."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from mirage.brain.networks import (
    NETWORKS, network_summary, parcel_hemispheres, parcel_labels, parcel_networks, plot_network_bars, top_network,
)
from mirage.errors import DataError

# parcels per network in Schaefer2018_1000Parcels_7Networks_order.txt (both hemispheres)
SCHAEFER_1000 = {"Vis": 162, "SomMot": 194, "DorsAttn": 122, "SalVentAttn": 121, "Limbic": 60, "Cont": 129,
                 "Default": 212}


def test_table_has_1000_parcels_left_then_right_and_7_networks():
    labels = parcel_labels(1000)
    assert len(labels) == 1000 and len(set(labels)) == 1000
    assert labels[0] == "7Networks_LH_Vis_1" and labels[499] == "7Networks_LH_Default_PHC_3"
    assert labels[500] == "7Networks_RH_Vis_1" and labels[999] == "7Networks_RH_Cont_PCC_2"
    hemis = parcel_hemispheres(1000)
    assert (hemis[:500] == "LH").all() and (hemis[500:] == "RH").all()
    assert dict(Counter(parcel_networks(1000).tolist())) == SCHAEFER_1000
    assert tuple(dict.fromkeys(parcel_networks(1000)[:500])) == NETWORKS  # networks in table order


@pytest.mark.parametrize("n", [7, 32, 100, 1500])
def test_other_parcel_counts_keep_order_and_proportions(n):
    table = parcel_labels(1000)
    labels = parcel_labels(n)
    assert labels == [table[int((i + 0.5) * 1000 / n)] for i in range(n)]
    hemis = parcel_hemispheres(n)
    assert (hemis[: n // 2] == "LH").all() and (hemis[n - n // 2:] == "RH").all()
    counts = Counter(parcel_networks(n).tolist())
    for net, k in SCHAEFER_1000.items():
        assert abs(counts.get(net, 0) - k * n / 1000) <= 2


def test_network_summary_means_and_sem_over_subjects(tmp_path):
    n = 32
    nets = parcel_networks(n)
    sub1 = np.where(nets == "Vis", 0.5, 0.1)
    sub2 = np.where(nets == "Vis", 0.3, 0.1)
    sub2[np.flatnonzero(nets == "Default")[0]] = np.nan  # a NaN parcel is left out, not propagated
    rows = network_summary({"a": {"sub-01": sub1, "sub-02": sub2}, "b": {"sub-01": sub1}}, n)
    assert [(r["model"], r["network"]) for r in rows] == [(m, net) for m in "ab" for net in NETWORKS]
    vis = rows[0]
    assert vis["mean_r"] == pytest.approx(0.4) and vis["sem"] == pytest.approx(np.std([0.5, 0.3], ddof=1) / np.sqrt(2))
    assert vis["n_subjects"] == 2 and vis["n_parcels"] == int((nets == "Vis").sum())
    default = next(r for r in rows if r["model"] == "a" and r["network"] == "Default")
    assert default["mean_r"] == pytest.approx(0.1) and default["sem"] == pytest.approx(0.0)
    assert next(r for r in rows if r["model"] == "b")["sem"] == 0.0  # one subject
    assert top_network(rows, "a") == "Vis"
    with pytest.raises(DataError, match=r"r\['a'\]\['sub-01'\].*expected \(32,\)"):
        network_summary({"a": {"sub-01": np.zeros(31)}}, n)
    fig = plot_network_bars(rows, title="planted Vis")
    fig.savefig(tmp_path / "bars.png")
    assert (tmp_path / "bars.png").stat().st_size > 5_000
