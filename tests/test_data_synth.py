"""The synthetic dataset: release layout, exact planted fMRI, planted signal visible in the stimuli."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from mirage.cli import main
from mirage.data.check import check_dataset
from mirage.data.fmri import load_fmri
from mirage.data.layout import Release
from mirage.data.media import MediaReader
from mirage.data.synth import load_truth, write_synthetic
from mirage.data.transcripts import read_rows
from mirage.errors import DataError
from mirage.metrics import noise_ceiling_split_half, pearson_r


def test_cli_synth_then_check_exits_0(tmp_path, capsys):
    out = tmp_path / "ds"
    args = ["--set", "data.synth.seasons=[1, 7]", "--set", "data.synth.movies=[figures]",
            "--set", "data.synth.ood_movies=[chaplin]"]
    assert main(["data", "synth", str(out), "--episodes", "1", "--seconds", "12", "--parcels", "8", "--seed", "3",
                 *args]) == 0
    capsys.readouterr()
    assert main(["data", "check", str(out), "--json", "--set", "data.n_parcels=8"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"], report["errors"]
    runs = report["subjects"]["sub-01"]["runs"]
    assert set(runs) == {"ses-001_task-s01e01a", "ses-002_task-s01e01b",
                         "ses-001_task-figures01_run-1", "ses-002_task-figures01_run-2"}
    assert all(shape[1] == 8 for shape in runs.values())
    # sub-02 misses a Friends run, sub-05 the second figures run, as the release misses runs
    assert "ses-002_task-s01e01b" not in report["subjects"]["sub-02"]["runs"]
    assert "ses-002_task-figures01_run-2" not in report["subjects"]["sub-05"]["runs"]
    assert report["subjects"]["sub-03"]["target_samples"]["ood"].keys() == {"chaplin1", "chaplin2"}
    assert not [p for p in tmp_path.iterdir() if p.name != "ds"]  # no temp dir left


def test_reader_returns_exactly_the_planted_fmri(synth_root, test_cfg):
    truth, arrays = load_truth(synth_root)
    release = Release(synth_root)
    assert release.subjects() == list(test_cfg.data.subjects)
    n = 0
    for sub in release.subjects():
        for run in release.fmri_runs(sub):
            x = load_fmri(run.path, run.key, test_cfg.data.n_parcels)
            assert x.dtype == np.float32
            np.testing.assert_array_equal(x, arrays[f"bold/{sub}/{run.key}"])
            assert truth["runs"][sub][run.key]["stimulus"] == run.stimulus_id
            n += 1
    assert n == sum(len(r) for r in truth["runs"].values()) > 0


def test_planted_snr_and_noise_ceiling(synth_root):
    truth, arrays = load_truth(synth_root)
    modality = np.array(truth["modality"])
    ceiling = np.array(truth["noise_ceiling"])
    assert set(modality) == {"vision", "audio", "text", "none"}
    assert (ceiling[modality == "none"] == 0).all() and (ceiling[modality != "none"] > 0.4).all()
    # the clean signal correlates with the fMRI as the ceiling says (r within runs, averaged)
    keys = [k[len("signal/"):] for k in arrays if k.startswith("signal/")]
    r = np.mean([pearson_r(arrays["signal/" + k], arrays["bold/" + k]) for k in keys], axis=0)
    planted = modality != "none"
    assert abs(r[planted].mean() - ceiling[planted].mean()) < 0.05
    # two repeats of the same movie (life01 _run-1/_run-2) give the ceiling by split half
    ncs = []
    for sub in truth["subjects"]:
        a, b = (arrays.get(f"bold/{sub}/{k}") for k in ("ses-001_task-life01_run-1", "ses-002_task-life01_run-2"))
        if a is not None and b is not None:
            n = min(len(a), len(b))
            ncs.append(noise_ceiling_split_half(a[:n], b[:n]))
    assert len(ncs) == 3  # sub-05 misses _run-2
    nc = np.mean(ncs, axis=0)
    assert nc[planted].mean() > nc[~planted].mean() + 0.2


def test_planted_properties_are_in_the_stimuli(synth_root, test_cfg):
    """Brightness, loudness and word rate of the files follow the truth's per-TR properties."""
    _, arrays = load_truth(synth_root)
    tr = test_cfg.data.tr
    st = Release(synth_root).stimuli()["s01e01a"]
    prop = arrays["property/s01e01a"]  # (n_trs, 3)
    n = prop.shape[0] - 1  # last TR is partial
    with MediaReader(st.video) as m:
        frames = m.frames_at((np.arange(n) + 0.5) * tr)
        brightness = frames.reshape(n, -1).mean(axis=1)
        audio = m.audio(0, n * tr)
    rms = np.log(np.sqrt((audio[: n * int(tr * 16000)].reshape(n, -1) ** 2).mean(axis=1)) + 1e-6)
    rate = np.array([len(r) for r in read_rows(st.transcript)][:n], dtype=float)
    assert np.corrcoef(brightness, prop[:n, 0])[0, 1] > 0.9
    assert np.corrcoef(rms, prop[:n, 1])[0, 1] > 0.9
    assert np.corrcoef(rate, prop[:n, 2])[0, 1] > 0.6


def test_synth_check_passes_on_fixture(synth_root, test_cfg):
    report = check_dataset(synth_root, test_cfg.data)
    assert report["ok"], report["errors"]
    assert report["warnings"] == []
    assert report["stimuli"]["chaplin1"]["transcript"] is None
    assert report["lengths"]["max_abs_diff_trs"] <= 1
    for sub in test_cfg.data.subjects:  # every subject has the release's atlas, labels 1..n_parcels
        assert report["subjects"][sub]["atlas"]["file"].startswith(f"{sub}_space-MNI152NLin2009cAsym_atlas-Schaefer18")


def test_synth_refuses_non_empty_target_and_cleans_up(tmp_path, test_cfg):
    out = tmp_path / "x"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="already exists"):
        write_synthetic(out, test_cfg.data.synth)
    assert (out / "keep.txt").read_text() == "mine"
    # unusable sizes are refused before anything is written
    bad = test_cfg.data.synth.model_copy(update={"seconds": 1.0})
    with pytest.raises(DataError, match="data.synth.seconds"):
        write_synthetic(tmp_path / "y", bad)
    assert sorted(os.listdir(tmp_path)) == ["x"]


def test_synth_interrupted_leaves_nothing(tmp_path, test_cfg, monkeypatch):
    import mirage.data.synth as synth

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(synth, "_write_subject", boom)
    small = test_cfg.data.synth.model_copy(update={"seasons": [1], "movies": [], "ood_movies": [], "seconds": 4.0})
    with pytest.raises(KeyboardInterrupt):  # interrupted after the movies were written
        write_synthetic(tmp_path / "z", small)
    assert os.listdir(tmp_path) == []
