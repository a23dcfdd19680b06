"""The release atlas: synthetic one written with the dataset, values <-> volume round trip, validation in data check."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from mirage.brain.atlas import atlas_path, find_atlas, load_atlas, synthetic_atlas, validate_atlas
from mirage.brain.maps import parcel_image
from mirage.brain.networks import parcel_networks
from mirage.data.check import check_dataset
from mirage.errors import DataError


@pytest.mark.parametrize("n", [32, 1000])
def test_synthetic_atlas_has_every_label_and_networks_in_bands(n):
    img = synthetic_atlas(n, seed=0)
    labels = np.asarray(img.dataobj)
    assert labels.ndim == 3 and np.issubdtype(labels.dtype, np.integer)
    assert set(np.unique(labels).tolist()) == set(range(n + 1))
    # plausible MNI grid: 4 mm voxels, origin at the MNI152 bounding box corner, left parcels at x < 0
    np.testing.assert_allclose(np.diag(img.affine)[:3], 4.0)
    ijk = np.argwhere(labels > 0)
    xyz = nib.affines.apply_affine(img.affine, ijk)
    lab = labels[labels > 0]
    assert (xyz[lab <= n // 2, 0] < 0).mean() > 0.95 and (xyz[lab > n - n // 2, 0] > 0).mean() > 0.95
    nets = parcel_networks(n)[lab - 1]
    assert xyz[nets == "Vis", 1].mean() < xyz[nets == "SomMot", 1].mean() < xyz[nets == "Default", 1].mean()


def test_values_to_image_and_back(synth_root, test_cfg, tmp_path):
    from nilearn.maskers import NiftiLabelsMasker

    n = test_cfg.data.n_parcels
    atlas = load_atlas(synth_root, "sub-01", n)
    assert find_atlas(synth_root, n).shape == atlas.shape and find_atlas(tmp_path, n) is None
    values = np.random.default_rng(0).normal(size=n)
    img = parcel_image(values, atlas)
    back = np.ravel(NiftiLabelsMasker(labels_img=atlas, standardize=None, reports=False).fit_transform(img))
    np.testing.assert_allclose(back, values, rtol=1e-5, atol=1e-6)
    with pytest.raises(DataError, match=rf"shape \(31,\), expected \({n},\)"):
        parcel_image(values[:-1], atlas)


def _save(path, data, like):
    nib.Nifti1Image(data, like.affine).to_filename(path)


def test_validate_rejects_missing_label_float_labels_and_4d(tmp_path):
    good = synthetic_atlas(32, seed=1)
    labels = np.asarray(good.dataobj)
    path = tmp_path / "atlas.nii.gz"
    _save(path, np.where(labels == 5, 0, labels).astype(np.int16), good)
    with pytest.raises(DataError, match=r"atlas\.nii\.gz: atlas labels do not match 32 parcels.*missing \[5\]"):
        validate_atlas(path, 32)
    _save(path, labels.astype(np.int16), good)
    with pytest.raises(DataError, match=r"missing none, unexpected \[32\]"):
        validate_atlas(path, 31)
    _save(path, labels.astype(np.float32) + 0.5 * (labels > 0), good)
    with pytest.raises(DataError, match="not whole numbers; expected integer parcel labels 0..32"):
        validate_atlas(path, 32)
    _save(path, np.stack([labels, labels], axis=-1).astype(np.int16), good)
    with pytest.raises(DataError, match=r"expected a 3-D volume"):
        validate_atlas(path, 32)
    path.write_bytes(b"not a nifti")
    with pytest.raises(DataError, match="not a readable NIfTI"):
        validate_atlas(path, 32)
    with pytest.raises(DataError, match="atlas not found"):
        validate_atlas(tmp_path / "none.nii.gz", 32)
    _save(path, labels.astype(np.float32), good)  # labels stored as whole-number floats are accepted
    assert validate_atlas(path, 32).shape == labels.shape


def test_data_check_validates_the_atlas(synth_copy, test_cfg):
    n = test_cfg.data.n_parcels
    report = check_dataset(synth_copy, test_cfg.data)
    assert report["ok"], report["errors"]
    assert report["subjects"]["sub-01"]["atlas"]["voxel_mm"] == [4.0, 4.0, 4.0]
    bad = atlas_path(synth_copy, "sub-03")
    labels = np.asarray(nib.load(bad).dataobj)
    _save(bad, np.where(labels == n, 0, labels).astype(np.int16), nib.load(bad))
    report = check_dataset(synth_copy, test_cfg.data)
    assert not report["ok"]
    errors = [e for e in report["errors"] if "atlas" in e]
    assert len(errors) == 1 and str(bad) in errors[0] and f"missing [{n}]" in errors[0], report["errors"]
    bad.unlink()  # a missing atlas is a note (no maps), not an error
    report = check_dataset(synth_copy, test_cfg.data)
    assert report["ok"], report["errors"]
    assert any("no atlas" in n and "sub-03" in n for n in report["notes"])


def test_unfetched_atlas_is_named_with_the_fetch_command(synth_copy, test_cfg):
    path = atlas_path(synth_copy, "sub-02")
    path.unlink()
    path.symlink_to(synth_copy / ".git" / "annex" / "objects" / "missing")
    report = check_dataset(synth_copy, test_cfg.data)
    assert not report["ok"]
    assert "datalad get" in report["errors"][0] and "fmri/sub-02/atlas/" in report["errors"][0]
    with pytest.raises(DataError, match="broken symlink"):
        load_atlas(synth_copy, "sub-02", test_cfg.data.n_parcels)
