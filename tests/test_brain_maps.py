"""Brain maps render to PNG (Agg): glass brain and fsaverage5 surface, dominant modality, time courses."""

from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np
import pytest

from mirage.brain.atlas import synthetic_atlas
from mirage.brain.maps import dominant_modality, plot_dominant_modality, vertex_labels, write_maps
from mirage.brain.networks import NETWORKS, parcel_networks
from mirage.brain.timecourses import choose_parcels, plot_time_courses
from mirage.errors import DataError

N = 100


@pytest.fixture(scope="module")
def atlas():
    return synthetic_atlas(N, seed=0)


def _png(fig, path) -> np.ndarray:
    fig.savefig(path, dpi=60)
    assert path.stat().st_size > 5_000
    return mpimg.imread(path)[..., :3]  # (H, W, 3)


def test_surface_vertices_carry_parcel_labels(atlas):
    vl = vertex_labels(atlas)
    for hemi, lab in vl.items():
        assert lab.shape == (10242,)
        assert (lab > 0).mean() > 0.9  # the ribbon covers the mesh
    assert set(np.unique(np.concatenate(list(vl.values())))) - {0} <= set(range(1, N + 1))


def test_maps_render_glass_and_surface(atlas, tmp_path):
    nets = parcel_networks(N)
    r = np.where(nets == "Vis", 0.6, 0.05)
    diff = np.where(nets == "Default", -0.2, 0.1)
    figs = write_maps({"r": r, "mirage_minus_linear": diff}, atlas, symmetric=("mirage_minus_linear",))
    assert set(figs) == {"r_glass", "r_surface", "mirage_minus_linear_glass", "mirage_minus_linear_surface"}
    for name, fig in figs.items():
        img = _png(fig, tmp_path / f"{name}.png")
        assert img.std() > 0.05  # something is drawn, not a blank canvas
    with pytest.raises(DataError, match="view 'flat'"):
        write_maps({"r": r}, atlas, views=("flat",))


def test_dominant_modality_colours_by_best_modality(atlas, tmp_path):
    rng = np.random.default_rng(0)
    r = {m: rng.uniform(0.0, 0.3, N) for m in ("vision", "audio", "text")}
    r["vision"][:10] = 0.9
    r["text"][10] = np.nan
    name, strength = dominant_modality(r)
    assert (name[:10] == "vision").all() and np.allclose(strength[:10], 0.9)
    assert name[10] in ("vision", "audio")  # NaN of one modality is ignored
    for view in ("surface", "glass"):
        img = _png(plot_dominant_modality(r, atlas, title="dominant", view=view), tmp_path / f"dom_{view}.png")
        blue = (img[..., 2] > 0.6) & (img[..., 0] < 0.3)  # vision is blue
        assert blue.mean() > 0.001


def test_time_courses_choose_best_median_and_network_parcels(tmp_path):
    nets = parcel_networks(N)
    r = np.linspace(-0.1, 0.8, N)
    r[3] = np.nan
    chosen = choose_parcels(r, nets)
    assert list(chosen)[:2] == ["best", "median"] and chosen["best"] == N - 1
    assert abs(r[chosen["median"]] - np.nanmedian(r)) <= np.diff(r[:3]).max()
    for net in NETWORKS:
        assert nets[chosen[net]] == net and r[chosen[net]] == np.nanmax(np.where(nets == net, r, np.nan))
    t = np.arange(50)[:, None]
    measured = np.sin(t / 5.0 + np.arange(N)) + 0.1
    fig = plot_time_courses(measured, measured * 2 + 1, chosen, tr=1.49, title="sub-01")
    _png(fig, tmp_path / "tc.png")
    with pytest.raises(DataError, match="out of range"):
        plot_time_courses(measured, measured, {"x": N}, tr=1.49)
    with pytest.raises(DataError, match="no finite value"):
        choose_parcels(np.full(N, np.nan), nets)
