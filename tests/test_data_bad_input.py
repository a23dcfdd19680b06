"""Every bad input of the data layer gives a clear error naming the file/key and the expectation."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
from test_data_release import write_movie

from mirage.cli import main
from mirage.data.check import check_dataset
from mirage.data.fmri import load_fmri
from mirage.data.layout import Release, load_pickled_dict
from mirage.data.media import MediaReader
from mirage.data.splits import split_runs
from mirage.data.transcripts import read_words
from mirage.errors import DataError

KEY = "ses-001_task-s01e01a"


def friends_h5(root, sub="sub-01"):
    return next((root / "fmri" / sub / "func").glob("*task-friends*_bold.h5"))


def problems(root, cfg):
    rep = check_dataset(root, cfg.data)
    assert not rep["ok"]
    return "\n".join(rep["errors"])


def test_truncated_h5(synth_copy, test_cfg):
    path = friends_h5(synth_copy)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    msg = problems(synth_copy, test_cfg)
    assert path.name in msg and ("truncated" in msg or "not a readable HDF5" in msg)
    with pytest.raises(DataError, match=path.name):
        load_fmri(path, KEY)


def test_corrupt_h5(synth_copy, test_cfg):
    path = friends_h5(synth_copy)
    path.write_bytes(b"\x00garbage" * 100)
    msg = problems(synth_copy, test_cfg)
    assert f"{path}: not a readable HDF5 file" in msg
    with pytest.raises(DataError, match="not a readable HDF5 file"):
        load_fmri(path, KEY)
    with pytest.raises(DataError, match=path.name):
        Release(synth_copy).fmri_runs("sub-01")


def test_wrong_parcel_count(synth_copy, test_cfg):
    path = friends_h5(synth_copy)
    with h5py.File(path, "a") as f:
        del f[KEY]
        f[KEY] = np.zeros((27, 31), np.float32)
    msg = problems(synth_copy, test_cfg)
    assert f"{path}: key '{KEY}': 31 parcels" in msg and "expected 32" in msg
    with pytest.raises(DataError, match=f"key '{KEY}' has 31 parcels.*expected 32"):
        load_fmri(path, KEY, n_parcels=32)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_or_inf_in_fmri(synth_copy, test_cfg, value):
    path = friends_h5(synth_copy)
    with h5py.File(path, "a") as f:
        f[KEY][3, 4] = value
    msg = problems(synth_copy, test_cfg)
    assert f"key '{KEY}': 1 NaN/inf values (first at TR 3, parcel 4)" in msg
    with pytest.raises(DataError, match=f"'{KEY}' has 1 non-finite values"):
        load_fmri(path, KEY)


@pytest.mark.parametrize(
    "column,cell,expect",
    [
        ("words_per_tr", "['hey', 'you'", "is not a Python list literal"),
        ("onsets_per_tr", "[0.1, 'x']", "is not a finite number"),
        ("durations_per_tr", "{'a': 1}", "expected a list"),
        ("words_per_tr", "['only one']", "expected equal lengths"),
    ],
)
def test_malformed_transcript(synth_copy, test_cfg, column, cell, expect):
    tsv = synth_copy / "stimuli/transcripts/friends/s1/friends_s01e01a.tsv"
    lines = tsv.read_text().splitlines()
    header = lines[0].split("\t")
    row = lines[1].split("\t")
    row[header.index(column)] = cell
    lines[1] = "\t".join(row)
    tsv.write_text("\n".join(lines) + "\n")
    msg = problems(synth_copy, test_cfg)
    assert f"{tsv}: line 2" in msg and expect in msg
    with pytest.raises(DataError, match="line 2"):
        read_words(tsv)


def test_transcript_missing_columns(synth_copy, test_cfg):
    tsv = synth_copy / "stimuli/transcripts/friends/s1/friends_s01e01a.tsv"
    tsv.write_text("text\twords\nhi\t['hi']\n")
    assert "missing columns" in problems(synth_copy, test_cfg)


def test_mkv_without_audio_track(synth_copy, test_cfg):
    video = synth_copy / "stimuli/movies/friends/s1/friends_s01e01a.mkv"
    video.unlink()
    write_movie(video, 40, audio=False)
    msg = problems(synth_copy, test_cfg)
    assert f"{video}: no audio track, expected an audio stream" in msg
    with MediaReader(video) as m, pytest.raises(DataError, match="no audio track"):
        m.audio(0.0, 1.0)


def test_missing_stimulus_file(synth_copy, test_cfg, capsys):
    video = synth_copy / "stimuli/movies/friends/s1/friends_s01e01a.mkv"
    video.unlink()
    msg = problems(synth_copy, test_cfg)
    assert f"key '{KEY}': stimulus file missing; expected {video}" in msg
    assert friends_h5(synth_copy).name in msg
    with pytest.raises(DataError, match=f"run '{KEY}' has no stimulus; expected video {video}"):
        split_runs(Release(synth_copy), test_cfg.data, "train")
    # the CLI exits 1 and names the file
    assert main(["data", "check", str(synth_copy), "--set", "data.n_parcels=32"]) == 1
    assert str(video) in capsys.readouterr().err


def test_length_mismatch_beyond_tolerance(synth_copy, test_cfg):
    path = friends_h5(synth_copy)
    with h5py.File(path, "a") as f:
        del f[KEY]
        f[KEY] = np.zeros((10, 32), np.float32)
    msg = problems(synth_copy, test_cfg)
    assert f"key '{KEY}': fMRI has 10 TRs" in msg and "data.max_length_mismatch_trs" in msg


def test_missing_subject_and_root(synth_copy, test_cfg, tmp_path):
    shutil.rmtree(synth_copy / "fmri" / "sub-03")
    assert "expected fMRI of sub-03" in problems(synth_copy, test_cfg)
    assert "not a directory" in problems(tmp_path / "nowhere", test_cfg)
    with pytest.raises(DataError, match="not a directory"):
        Release(tmp_path / "nowhere")


def test_target_samples_refuse_code(synth_copy, test_cfg):
    class Evil:
        def __reduce__(self):
            return (shutil.rmtree, (str(synth_copy),))

    path = synth_copy / "fmri/sub-01/target_sample_number/sub-01_ood_fmri_samples.npy"
    np.save(path, np.array([Evil()], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="refusing to load shutil.rmtree"):
        load_pickled_dict(path)
    assert "sub-01_ood_fmri_samples.npy" in problems(synth_copy, test_cfg)
    assert synth_copy.is_dir()
