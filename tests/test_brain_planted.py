"""A signal planted in one Yeo-7 network's parcels is found there: synthetic atlas + plant -> encoding fit
on the measured fMRI -> network summary, brain map and time courses."""

from __future__ import annotations

import numpy as np
import pytest

from mirage.brain.atlas import load_atlas
from mirage.brain.ceiling import load_ceiling
from mirage.brain.networks import NETWORKS, network_summary, parcel_labels, parcel_networks, top_network
from mirage.brain.timecourses import choose_parcels, plot_time_courses
from mirage.data.fmri import load_fmri, zscore
from mirage.data.layout import Release
from mirage.data.synth import load_truth, write_synthetic
from mirage.metrics import noise_ceiling_normalized, pearson_r

N_PARCELS = 100
PLANTED = "DorsAttn"  # not the first network of the table, so an order slip cannot pass
LAGS = 8  # TRs of stimulus history in the encoding model (covers the HRF peak at ~4 TRs)


@pytest.fixture(scope="module")
def planted_root(tmp_path_factory, test_cfg):
    synth = test_cfg.data.synth.model_copy(update={
        "seasons": [1, 2, 6], "episodes": 1, "movies": [], "ood_movies": [], "seconds": 60.0,
        "parcels": N_PARCELS, "planted_network": PLANTED, "planted_fraction": 1.0, "seed": 11,
    })
    return write_synthetic(tmp_path_factory.mktemp("planted") / "ds", synth, tr=test_cfg.data.tr)


def _lagged(props: np.ndarray, n: int) -> np.ndarray:
    """Stimulus properties (n_trs, 3) and their LAGS - 1 delayed copies, cut to n TRs: (n, 3 * LAGS + 1)."""
    x = (props - props.mean(axis=0)) / np.maximum(props.std(axis=0), 1e-8)
    x = np.concatenate([x, np.zeros((max(0, n - len(x)), 3))])[:n]
    cols = [np.concatenate([np.zeros((k, 3)), x[: n - k]]) for k in range(LAGS)]
    return np.concatenate([*cols, np.ones((n, 1))], axis=1)


def _fit_r(root, subject: str, truth_arrays: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ridge from the stimulus properties to the subject's fMRI, trained on seasons 1-2, scored on season 6.

    Returns per-parcel validation r (P,), measured (T, P) and predicted (T, P) validation fMRI.
    """
    xs = {"train": [], "val": []}
    ys = {"train": [], "val": []}
    for run in Release(root).fmri_runs(subject):
        y = zscore(load_fmri(run.path, run.key, N_PARCELS))
        split = "val" if run.stimulus_id.startswith("s06") else "train"
        xs[split].append(_lagged(truth_arrays[f"property/{run.stimulus_id}"], len(y)))
        ys[split].append(y)
    x, y = np.concatenate(xs["train"]), np.concatenate(ys["train"])
    w = np.linalg.solve(x.T @ x + 10.0 * np.eye(x.shape[1]), x.T @ y)  # (F, P)
    xv, yv = np.concatenate(xs["val"]), np.concatenate(ys["val"])
    pred = xv @ w
    return pearson_r(pred, yv), yv, pred


def test_planted_network_is_the_top_network(planted_root, tmp_path):
    truth, arrays = load_truth(planted_root)
    networks = parcel_networks(N_PARCELS)
    planted = np.array(truth["modality"]) != "none"
    assert planted.any() and set(networks[planted]) == {PLANTED}  # the plant is where the config says
    fits = {sub: _fit_r(planted_root, sub, arrays) for sub in truth["subjects"]}
    r = {"ridge": {sub: f[0] for sub, f in fits.items()}}
    rows = network_summary(r, N_PARCELS)
    assert top_network(rows, "ridge") == PLANTED
    by_net = {row["network"]: row for row in rows}
    others = max(by_net[n]["mean_r"] for n in NETWORKS if n != PLANTED)
    assert by_net[PLANTED]["mean_r"] > others + 0.2, rows
    assert by_net[PLANTED]["n_subjects"] == len(truth["subjects"]) and by_net[PLANTED]["sem"] > 0

    # the truth's noise ceiling: the fit of a planted parcel reaches about its ceiling, the others have none
    ceiling = load_ceiling(planted_root, N_PARCELS)
    assert ceiling is not None and ceiling.source == "synthetic truth"
    norm = np.stack([noise_ceiling_normalized(f[0], ceiling.values, 0.1) for f in fits.values()])  # (S, P)
    assert np.isnan(norm[:, ~planted]).all()
    assert 0.8 < np.nanmean(norm[:, planted]) < 1.1

    # the atlas written with the dataset carries the same networks, and time courses pick the planted parcel
    atlas = load_atlas(planted_root, "sub-01", N_PARCELS)
    assert int(np.asarray(atlas.dataobj).max()) == N_PARCELS
    r1, measured, predicted = fits["sub-01"]
    chosen = choose_parcels(r1, networks)
    assert networks[chosen["best"]] == PLANTED and chosen[PLANTED] == chosen["best"]
    fig = plot_time_courses(measured, predicted, chosen, tr=1.49, title="sub-01 s06",
                            labels=parcel_labels(N_PARCELS))
    out = tmp_path / "tc.png"
    fig.savefig(out)
    assert out.stat().st_size > 10_000
