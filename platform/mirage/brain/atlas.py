"""The release's Schaefer 2018 atlas (per subject, MNI152NLin2009cAsym): path, validation, a synthetic one.

The Algonauts 2025 release ships, for every subject,
``fmri/<sub>/atlas/<sub>_space-MNI152NLin2009cAsym_atlas-Schaefer18_parcel-1000Par7Net_desc-dseg_parcellation.nii.gz``:
a 3-D volume whose voxels hold the parcel label (1..1000, 0 = background). Parcel index i (the
column of an fMRI sample) is label i + 1.

The synthetic atlas (``write_synthetic_atlas``) is a cortical ribbon on a coarse MNI grid: the
voxels within ``0.75 * voxel_mm`` of the fsaverage5 pial, white or mid-thickness surface (the mesh
bundled with nilearn, so nothing is downloaded), split per hemisphere into parcels by farthest-point
seeds and nearest-seed assignment. Seeds are sorted posterior to anterior and take the labels of
their hemisphere in label order, so the Yeo-7 networks of ``mirage.brain.networks`` form bands from
the occipital pole (Vis) to the frontal lobe (Default), and every label 1..P owns at least its seed
voxel.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mirage.data.layout import ATLAS_PART
from mirage.errors import DataError

ATLAS_SUFFIX = f"{ATLAS_PART}_desc-dseg_parcellation.nii.gz"
MNI_ORIGIN = (-90.0, -126.0, -72.0)
"""MNI coordinates (mm) of the first voxel centre of the synthetic grid (the MNI152 bounding box)."""
MNI_EXTENT = (180.0, 216.0, 180.0)
"""Extent (mm) of the synthetic grid along x, y, z."""


def atlas_path(data_root: str | os.PathLike, subject: str) -> Path:
    """``<root>/fmri/<sub>/atlas/<sub>_space-MNI152NLin2009cAsym_atlas-Schaefer18_parcel-1000Par7Net_desc-dseg_parcellation.nii.gz``."""
    return Path(data_root) / "fmri" / subject / "atlas" / f"{subject}_{ATLAS_SUFFIX}"


def validate_atlas(path: str | os.PathLike, n_parcels: int):
    """Load ``path`` and check it is a parcellation with labels exactly {0} and 1..n_parcels.

    Returns the nibabel image. Raises DataError naming the file and what was expected: not found,
    a broken symlink (content not fetched), not a readable NIfTI, not 3-D, labels that are not whole
    numbers, or a label set other than 1..n_parcels (missing and unexpected labels listed).
    Labels stored as floats are accepted when every value is a whole number.
    """
    import nibabel as nib

    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise DataError(f"{path}: broken symlink (atlas content not fetched); fetch it with `datalad get {path}`")
    if not path.is_file():
        raise DataError(f"{path}: atlas not found; expected a NIfTI parcellation with labels 1..{n_parcels}")
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel raises several types for a corrupt file
        raise DataError(f"{path}: not a readable NIfTI image ({type(e).__name__}: {e})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path}: atlas has shape {data.shape}, expected a 3-D volume of parcel labels")
    if not np.issubdtype(data.dtype, np.integer):
        if not np.issubdtype(data.dtype, np.floating) or not np.all(np.isfinite(data)) or np.any(data != np.round(data)):
            raise DataError(f"{path}: atlas voxels are {data.dtype} with values that are not whole numbers; "
                            f"expected integer parcel labels 0..{n_parcels}")
    labels = np.unique(data).astype(np.int64)
    found = set(labels.tolist()) - {0}
    expected = set(range(1, n_parcels + 1))
    missing, extra = sorted(expected - found), sorted(found - expected)
    if missing or extra:
        raise DataError(
            f"{path}: atlas labels do not match {n_parcels} parcels: expected exactly 1..{n_parcels} "
            f"(0 = background); missing {_few(missing)}, unexpected {_few(extra)}"
        )
    return img


def _few(values: list[int], shown: int = 8) -> str:
    if not values:
        return "none"
    head = ", ".join(str(v) for v in values[:shown])
    return f"[{head}{f', ... ({len(values)} in all)' if len(values) > shown else ''}]"


def load_atlas(data_root: str | os.PathLike, subject: str, n_parcels: int):
    """The subject's atlas from the release at ``data_root``, validated (see ``validate_atlas``)."""
    return validate_atlas(atlas_path(data_root, subject), n_parcels)


def find_atlas(data_root: str | os.PathLike, n_parcels: int, subjects: list[str] | None = None):
    """The first existing subject atlas (``subjects`` order, else every ``fmri/sub-*``), validated; None if none."""
    root = Path(data_root)
    if subjects is None:
        fmri = root / "fmri"
        subjects = sorted(p.name for p in fmri.iterdir() if p.name.startswith("sub-")) if fmri.is_dir() else []
    for sub in subjects:
        path = atlas_path(root, sub)
        if path.exists() or path.is_symlink():
            return validate_atlas(path, n_parcels)
    return None


# ---------------------------------------------------------------- synthetic


def synthetic_atlas(n_parcels: int, seed: int, voxel_mm: float = 4.0):
    """A synthetic Schaefer-like atlas (see the module docstring): nibabel Nifti1Image, int16 labels 0..P.

    Raises DataError if the ribbon has fewer voxels in a hemisphere than that hemisphere's parcels.
    """
    import nibabel as nib
    from scipy.spatial import cKDTree

    from mirage.brain.networks import parcel_hemispheres

    shape = tuple(int(round(e / voxel_mm)) + 1 for e in MNI_EXTENT)
    affine = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    affine[:3, 3] = MNI_ORIGIN
    ijk = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), axis=-1).reshape(-1, 3)
    xyz = ijk * voxel_mm + np.asarray(MNI_ORIGIN)  # (V, 3) mm
    hemi_points = _mesh_points()
    trees = {h: cKDTree(p) for h, p in hemi_points.items()}
    dist = {h: t.query(xyz, distance_upper_bound=voxel_mm)[0] for h, t in trees.items()}  # (V,) each
    in_ribbon = np.minimum(dist["LH"], dist["RH"]) < 0.75 * voxel_mm
    voxel_hemi = np.where(dist["LH"] <= dist["RH"], "LH", "RH")
    labels = np.zeros(len(xyz), dtype=np.int16)
    hemis = parcel_hemispheres(n_parcels)
    rng = np.random.default_rng(seed)
    for h in ("LH", "RH"):
        mine = np.flatnonzero(hemis == h) + 1  # labels of this hemisphere, in label order
        vox = np.flatnonzero(in_ribbon & (voxel_hemi == h))
        if len(mine) == 0:
            continue
        if len(vox) < len(mine):
            raise DataError(f"synthetic atlas: {len(vox)} ribbon voxels in {h} at {voxel_mm} mm, fewer than its "
                            f"{len(mine)} parcels; expected a smaller voxel size or fewer parcels")
        seeds = vox[_farthest_points(xyz[vox], len(mine), rng)]
        seeds = seeds[np.argsort(xyz[seeds, 1], kind="stable")]  # posterior -> anterior
        nearest = cKDTree(xyz[seeds]).query(xyz[vox])[1]
        labels[vox] = mine[nearest]
    return nib.Nifti1Image(labels.reshape(shape), affine)


def write_synthetic_atlas(path: str | os.PathLike, n_parcels: int, seed: int, voxel_mm: float = 4.0) -> Path:
    """Write ``synthetic_atlas(n_parcels, seed, voxel_mm)`` to ``path`` (parents made) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = synthetic_atlas(n_parcels, seed, voxel_mm)
    img.to_filename(path)
    return path


def _mesh_points() -> dict[str, np.ndarray]:
    """Pial, white and mid-thickness vertices of fsaverage5 per hemisphere: {'LH': (N, 3), 'RH': (N, 3)} mm."""
    from nilearn.datasets import load_fsaverage

    mesh = load_fsaverage("fsaverage5")
    out = {}
    for h, part in (("LH", "left"), ("RH", "right")):
        pial = np.asarray(mesh["pial"].parts[part].coordinates, dtype=np.float64)
        white = np.asarray(mesh["white_matter"].parts[part].coordinates, dtype=np.float64)
        out[h] = np.concatenate([pial, white, (pial + white) / 2])
    return out


def _farthest_points(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``k`` points of ``points`` (N, 3) spread by farthest-point sampling: (k,) int, distinct."""
    chosen = np.empty(k, dtype=np.int64)
    chosen[0] = rng.integers(len(points))
    d = np.linalg.norm(points - points[chosen[0]], axis=1)
    for j in range(1, k):
        chosen[j] = int(np.argmax(d))
        d = np.minimum(d, np.linalg.norm(points - points[chosen[j]], axis=1))
    return chosen
