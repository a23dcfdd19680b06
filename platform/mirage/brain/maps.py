"""Per-parcel values drawn on the brain: glass brain (volume) and fsaverage5 surface views.

A parcel map is a (P,) array, parcel i = atlas label i + 1. ``parcel_image`` puts it in the atlas
volume with ``NiftiLabelsMasker.inverse_transform``; surface views take each fsaverage5 vertex's
label from the atlas (``vol_to_surf``, nearest most frequent label between the white and pial
surfaces) and colour it by its parcel's value, so no value is blended across parcels. The mesh,
its inflated form and sulcal depth are the fsaverage5 files bundled with nilearn (no download).

Every plot returns a matplotlib Figure (Agg canvas); the caller saves or logs it, then closes it.
"""

from __future__ import annotations

import numpy as np

from mirage.errors import DataError

VIEWS = ("glass", "surface")
MODALITY_COLOURS = {"vision": "#1f77b4", "audio": "#ff7f0e", "text": "#2ca02c"}
_EXTRA_COLOURS = ("#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")
_FAINT = np.array([0.85, 0.85, 0.85])
_STEPS = 64  # colours per modality in the dominant-modality colour map
_SHOWN = 1e-6  # values closer to 0 than this are not coloured (background and NaN parcels)


def _labels(atlas_img) -> np.ndarray:
    data = np.asanyarray(atlas_img.dataobj)
    return np.rint(data[..., 0] if data.ndim == 4 else data).astype(np.int64)


def _check(values, atlas_img, name: str = "values") -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    n = int(_labels(atlas_img).max())
    if v.shape != (n,):
        raise DataError(f"{name}: shape {v.shape}, expected ({n},) (one value per atlas parcel)")
    return v


def parcel_image(values, atlas_img):
    """The (P,) parcel values as a volume in the atlas space: Nifti1Image, float32, 0 outside parcels.

    NaN values become 0. Raises DataError if ``values`` is not (P,) with P the atlas's largest label.
    """
    from nilearn.maskers import NiftiLabelsMasker

    v = np.nan_to_num(_check(values, atlas_img), nan=0.0).astype(np.float32)
    masker = NiftiLabelsMasker(labels_img=atlas_img, reports=False).fit()
    img = masker.inverse_transform(v[None])  # (X, Y, Z, 1) or (X, Y, Z)
    if len(img.shape) == 4:
        from nilearn.image import index_img

        img = index_img(img, 0)
    return img


def vertex_labels(atlas_img) -> dict[str, np.ndarray]:
    """Atlas label of every fsaverage5 vertex: {'left': (10242,) int, 'right': (10242,) int}, 0 = none."""
    from nilearn.datasets import load_fsaverage
    from nilearn.surface import vol_to_surf

    mesh = load_fsaverage("fsaverage5")
    img = _int_image(atlas_img)
    return {
        h: np.rint(vol_to_surf(img, mesh["pial"].parts[h], inner_mesh=mesh["white_matter"].parts[h],
                               interpolation="nearest_most_frequent")).astype(np.int64)
        for h in ("left", "right")
    }


def _int_image(atlas_img):
    import nibabel as nib

    return nib.Nifti1Image(_labels(atlas_img).astype(np.int32), atlas_img.affine)


def _vertex_values(values: np.ndarray, vlabels: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for h, lab in vlabels.items():
        v = np.full(lab.shape, np.nan)
        ok = (lab > 0) & (lab <= len(values))
        v[ok] = values[lab[ok] - 1]
        out[h] = v
    return out


def _limits(values: np.ndarray, symmetric: bool, vmax: float | None) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    top = vmax if vmax is not None else (float(np.max(np.abs(finite))) if finite.size else 1.0)
    top = top if top > 0 else 1.0
    if symmetric or (finite.size and finite.min() < 0):
        return -top, top
    return 0.0, top


def plot_parcel_map(values, atlas_img, title: str = "", view: str = "glass", cmap: str | None = None,
                    symmetric: bool = False, vmax: float | None = None):
    """Draw (P,) parcel values on the brain.

    Args:
        values: (P,) one value per parcel (NaN = not drawn).
        atlas_img: the atlas (``mirage.brain.atlas.load_atlas``).
        view: 'glass' (glass brain, four projections) or 'surface' (fsaverage5 inflated, lateral
            and medial of both hemispheres).
        cmap: matplotlib colour map; default 'RdBu_r' when symmetric or values go below 0, else 'inferno'.
        symmetric: colour limits -vmax..vmax (differences).
        vmax: upper colour limit; default the largest |value|.

    Returns a matplotlib Figure.
    """
    v = _check(values, atlas_img)
    vmin, top = _limits(v, symmetric, vmax)
    cmap = cmap or ("RdBu_r" if vmin < 0 else "inferno")
    if view == "glass":
        return _glass(parcel_image(v, atlas_img), title, cmap, vmin, top)
    if view == "surface":
        return _surface(_vertex_values(v, vertex_labels(atlas_img)), title, cmap, vmin, top)
    raise DataError(f"view {view!r}: expected one of {VIEWS}")


def _glass(img, title: str, cmap, vmin: float, vmax: float):
    from matplotlib.figure import Figure
    from nilearn.plotting import plot_glass_brain

    fig = Figure(figsize=(10, 3.2))
    plot_glass_brain(img, figure=fig, display_mode="lyrz", colorbar=True, plot_abs=False, cmap=cmap,
                               vmin=vmin, vmax=vmax, threshold=_SHOWN, title=title or None,
                               symmetric_cbar=vmin < 0)
    return fig


def _surface(vertex: dict[str, np.ndarray], title: str, cmap, vmin: float, vmax: float, colorbar: bool = True,
             avg_method: str = "mean"):
    from matplotlib.figure import Figure
    from nilearn.datasets import load_fsaverage, load_fsaverage_data
    from nilearn.plotting import plot_surf

    mesh = load_fsaverage("fsaverage5")
    sulc = load_fsaverage_data(mesh="fsaverage5", mesh_type="inflated", data_type="sulcal")
    fig = Figure(figsize=(10, 7.5))
    panels = [("left", "lateral"), ("left", "medial"), ("right", "lateral"), ("right", "medial")]
    for k, (hemi, side) in enumerate(panels):
        ax = fig.add_subplot(2, 2, k + 1, projection="3d")
        data = np.nan_to_num(vertex[hemi], nan=0.0)
        plot_surf(mesh["inflated"].parts[hemi], surf_map=data, bg_map=sulc.data.parts[hemi], hemi=hemi,
                  view=side, cmap=cmap, vmin=vmin, vmax=vmax, threshold=_SHOWN, avg_method=avg_method,
                  colorbar=colorbar and k == len(panels) - 1, axes=ax, figure=fig, bg_on_data=False)
        ax.set_title(f"{hemi} {side}", fontsize="small")
    if title:
        fig.suptitle(title)
    return fig


# ------------------------------------------------------------ dominant modality


def dominant_modality(r_by_modality: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Modality with the highest r per parcel and that r: ((P,) str, (P,) float); '' and NaN where all are NaN."""
    names = list(r_by_modality)
    if not names:
        raise DataError("dominant_modality: expected r for at least one modality, got none")
    stack = np.stack([np.asarray(r_by_modality[m], dtype=np.float64) for m in names])  # (M, P)
    anyf = np.isfinite(stack).any(axis=0)
    best = np.argmax(np.where(np.isfinite(stack), stack, -np.inf), axis=0)  # (P,)
    strength = np.where(anyf, stack[best, np.arange(stack.shape[1])], np.nan)
    return np.where(anyf, np.array(names)[best], ""), strength


def _modality_cmap(names: list[str]):
    from matplotlib.colors import ListedColormap, to_rgb

    colours = []
    for k, m in enumerate(names):
        c = np.array(to_rgb(MODALITY_COLOURS.get(m, _EXTRA_COLOURS[k % len(_EXTRA_COLOURS)])))
        s = np.linspace(0, 1, _STEPS)[:, None]
        colours.append((1 - s) * _FAINT + s * c)
    return ListedColormap(np.concatenate(colours))


def plot_dominant_modality(r_by_modality: dict[str, np.ndarray], atlas_img, title: str = "", view: str = "surface",
                           vmax: float | None = None):
    """Colour every parcel by the modality that predicts it best, saturation by that r.

    Args:
        r_by_modality: modality -> (P,) r of a model using that modality alone (or any per-modality
            score); modality colours are fixed for vision/audio/text.
        view: 'surface' (fsaverage5, every parcel visible) or 'glass' (glass brain; a maximum
            projection, so along a line of sight a later modality of ``r_by_modality`` hides an
            earlier one: read it as an overview only).
        vmax: r at full saturation; default the 99th percentile of the dominant r. r <= 0 is faint grey.

    Returns a matplotlib Figure with a legend of the modalities.
    """
    from matplotlib.patches import Patch

    names = list(r_by_modality)
    dom, strength = dominant_modality({m: _check(r_by_modality[m], atlas_img, f"r[{m!r}]") for m in names})
    finite = strength[np.isfinite(strength)]
    top = vmax if vmax is not None else (float(np.percentile(finite, 99)) if finite.size else 1.0)
    top = top if top > 0 else 1.0
    index = np.array([names.index(d) if d else -1 for d in dom])
    sat = np.clip(np.nan_to_num(strength, nan=0.0) / top, 0.0, 1.0 - 1e-6)
    code = np.where(index >= 0, 1.0 + index + sat, np.nan)  # modality k occupies [1 + k, 2 + k)
    cmap = _modality_cmap(names)
    lo, hi = 1.0, 1.0 + len(names)
    if view == "surface":
        fig = _surface(_vertex_values(code, vertex_labels(atlas_img)), title, cmap, lo, hi, colorbar=False,
                       avg_method="median")
    elif view == "glass":
        from matplotlib.figure import Figure
        from nilearn.plotting import plot_glass_brain

        fig = Figure(figsize=(10, 3.2))
        plot_glass_brain(parcel_image(code, atlas_img), figure=fig, display_mode="lyrz", colorbar=False,
                                   plot_abs=False, cmap=cmap, vmin=lo, vmax=hi, threshold=0.5, title=title or None)
    else:
        raise DataError(f"view {view!r}: expected one of {VIEWS}")
    handles = [Patch(color=MODALITY_COLOURS.get(m, _EXTRA_COLOURS[k % len(_EXTRA_COLOURS)]), label=m)
               for k, m in enumerate(names)]
    fig.legend(handles=handles, loc="lower center", ncol=len(names), fontsize="small",
               title=f"dominant modality (saturation: r from 0 to {top:.2f})", title_fontsize="small")
    return fig


def write_maps(maps: dict[str, np.ndarray], atlas_img, views: tuple[str, ...] = VIEWS,
               symmetric: tuple[str, ...] = ()) -> dict[str, object]:
    """Draw every (P,) map in every view: {'<name>_<view>': Figure}. Names in ``symmetric`` get a
    symmetric diverging colour map (differences)."""
    out = {}
    for name, values in maps.items():
        for view in views:
            out[f"{name}_{view}"] = plot_parcel_map(values, atlas_img, title=name, view=view,
                                                    symmetric=name in symmetric)
    return out
