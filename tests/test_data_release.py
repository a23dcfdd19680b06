"""A dataset written by someone else in the release layout, with the release's quirks, checks and loads.

Written here by hand with h5py, pandas and PyAV (not with the synthetic writer):
29.97 fps and 25 fps video of different sizes, stereo 44.1 kHz and mono 48 kHz
audio (s16), float64 h5, a missing run, ``_run-1``/``_run-2`` keys, no transcript
for chaplin, fMRI lengths off by one or two TRs from the stimulus, pandas-written
transcripts with quotes and empty rows.
"""

from __future__ import annotations

import json
from fractions import Fraction

import av
import h5py
import numpy as np
import pandas as pd
import pytest

from mirage.cli import main
from mirage.config import load_config
from mirage.data.check import check_dataset
from mirage.data.fmri import load_fmri
from mirage.data.layout import Release
from mirage.data.media import MediaReader
from mirage.data.splits import split_runs, split_stimuli
from mirage.data.transcripts import read_words

P = 16
SUBJECTS = ["sub-01", "sub-02", "sub-03", "sub-05"]
ATLAS = "space-MNI152NLin2009cAsym_atlas-Schaefer18_parcel-1000Par7Net"


def write_movie(path, seconds, fps=Fraction(30000, 1001), size=(48, 32), rate=44100, layout="stereo", audio=True,
                samples=None):
    """An mkv with H.264 video (frame i has grey level 8 * i mod 256) and s16 AAC audio.

    samples: float (n, channels) in [-1, 1] at ``rate``; default a 440 Hz tone of amplitude 8000 / 32768.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    with av.open(str(path), "w") as c:
        fps = Fraction(fps)
        vs = c.add_stream("libx264", rate=fps)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        ast = c.add_stream("aac", rate=rate) if audio else None
        if ast is not None:
            ast.layout = layout
        n = int(seconds * fps)
        for i in range(n):
            f = av.VideoFrame.from_ndarray(np.full((h, w, 3), (8 * i) % 256, np.uint8), format="rgb24")
            f.pts, f.time_base = i, 1 / fps
            c.mux(vs.encode(f))
        c.mux(vs.encode(None))
        if ast is not None:
            nch = 2 if layout == "stereo" else 1
            if samples is None:
                t = np.arange(int(seconds * rate)) / rate
                samples = np.repeat((8000 / 32768 * np.sin(2 * np.pi * 440 * t))[:, None], nch, axis=1)
            x = np.round(np.asarray(samples) * 32767).astype(np.int16)  # (n, C)
            for lo in range(0, len(x), 1024):
                chunk = x[lo: lo + 1024].reshape(1, -1)  # packed (1, n * channels)
                af = av.AudioFrame.from_ndarray(chunk, format="s16", layout=layout)
                af.sample_rate, af.pts, af.time_base = rate, lo, Fraction(1, rate)
                c.mux(ast.encode(af))
            c.mux(ast.encode(None))


def write_tsv(path, rows):
    """rows: list of lists of (word, onset, duration); written as pandas writes the release tsv."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({
        "text_per_tr": [" ".join(w for w, _, _ in r) for r in rows],
        "words_per_tr": [str([w for w, _, _ in r]) for r in rows],
        "onsets_per_tr": [str([o for _, o, _ in r]) for r in rows],
        "durations_per_tr": [str([d for _, _, d in r]) for r in rows],
    }).to_csv(path, sep="\t", index=False)


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    root = tmp_path_factory.mktemp("foreign")
    mv = root / "stimuli" / "movies"
    tx = root / "stimuli" / "transcripts"
    write_movie(mv / "friends/s1/friends_s01e02a.mkv", 12)
    write_movie(mv / "friends/s6/friends_s06e01a.mkv", 12)
    write_movie(mv / "friends/s7/friends_s07e01a.mkv", 6)
    write_movie(mv / "movie10/figures/figures01.mkv", 12, fps=25, size=(40, 30), rate=48000, layout="mono")
    write_movie(mv / "ood/chaplin/task-chaplin1_video.mkv", 6)
    quirky = [[("Hey", 0.5, 0.3), ("I'm", 0.9, 0.2)], [], [('say "hi"', 3.1, 0.4)], [("", 4.6, 0.1)]] + [[]] * 5
    write_tsv(tx / "friends/s1/friends_s01e02a.tsv", quirky)
    write_tsv(tx / "friends/s6/friends_s06e01a.tsv", [[("okay", 1.0, 0.2)]] + [[]] * 8)
    write_tsv(tx / "friends/s7/friends_s07e01a.tsv", [[]] * 5)
    write_tsv(tx / "movie10/figures/movie10_figures01.tsv", [[("space", 2.0, 0.5)]] + [[]] * 8)
    rng = np.random.default_rng(0)
    for sub in SUBJECTS:
        func = root / "fmri" / sub / "func"
        func.mkdir(parents=True)
        with h5py.File(func / f"{sub}_task-friends_{ATLAS}_desc-s123456_bold.h5", "w") as f:
            f["ses-004_task-s01e02a"] = rng.standard_normal((10, P))  # float64, stimulus 9 TRs
            if sub != "sub-02":  # a missing run
                f["ses-011_task-s06e01a"] = rng.standard_normal((7, P))  # 2 TRs short
        with h5py.File(func / f"{sub}_task-movie10_{ATLAS}_bold.h5", "w") as f:
            f["ses-002_task-figures01_run-1"] = rng.standard_normal((9, P)).astype(np.float32)
            f["ses-003_task-figures01_run-2"] = rng.standard_normal((8, P))
        tsn = root / "fmri" / sub / "target_sample_number"
        tsn.mkdir()
        np.save(tsn / f"{sub}_friends-s7_fmri_samples.npy", {"s07e01a": np.int64(4)})
        np.save(tsn / f"{sub}_ood_fmri_samples.npy", {"chaplin1": 4})
    return root


@pytest.fixture
def cfg16():
    return load_config("demo", ["data.n_parcels=16"]).data


def test_foreign_release_passes_check(foreign, cfg16):
    rep = check_dataset(foreign, cfg16)
    assert rep["ok"], rep["errors"]
    assert rep["warnings"] == []
    assert rep["subjects"]["sub-01"]["runs"] == {
        "ses-004_task-s01e02a": [10, P], "ses-011_task-s06e01a": [7, P],
        "ses-002_task-figures01_run-1": [9, P], "ses-003_task-figures01_run-2": [8, P],
    }
    assert "ses-011_task-s06e01a" not in rep["subjects"]["sub-02"]["runs"]
    assert rep["subjects"]["sub-01"]["dtypes"] == ["float32", "float64"]
    s = rep["stimuli"]["s01e02a"]
    assert (s["fps"], s["sample_rate"], s["channels"], s["size"]) == (29.97, 44100, 2, [48, 32])
    f = rep["stimuli"]["figures01"]
    assert (f["fps"], f["sample_rate"], f["channels"]) == (25.0, 48000, 1)
    assert rep["stimuli"]["chaplin1"]["transcript"] is None
    assert rep["lengths"]["max_abs_diff_trs"] == 2 and rep["lengths"]["runs_differing"] > 0
    assert rep["subjects"]["sub-05"]["target_samples"] == {"friends-s7": {"s07e01a": 4}, "ood": {"chaplin1": 4}}
    assert rep["splits"]["val"]["runs"] == {"sub-01": 1, "sub-03": 1, "sub-05": 1}


def test_foreign_release_check_cli(foreign, capsys):
    assert main(["data", "check", str(foreign), "--set", "data.n_parcels=16"]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "sub-05" in out
    assert main(["data", "check", str(foreign), "--json", "--set", "data.n_parcels=16"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


def test_foreign_release_loads(foreign, cfg16):
    rel = Release(foreign)
    assert rel.subjects() == SUBJECTS
    runs = {r.key: r for r in rel.fmri_runs("sub-01")}
    assert runs["ses-003_task-figures01_run-2"].stimulus_id == "figures01"
    assert runs["ses-002_task-figures01_run-1"].stimulus_id == "figures01"
    r = runs["ses-004_task-s01e02a"]
    x = load_fmri(r.path, r.key, P)
    with h5py.File(r.path) as f:
        raw = f[r.key][()]
    assert raw.dtype == np.float64 and x.dtype == np.float32
    np.testing.assert_array_equal(x, raw.astype(np.float32))
    st = rel.stimuli()
    assert st["chaplin1"].transcript is None and st["chaplin1"].source == "ood" and st["chaplin1"].group == "chaplin"
    words = read_words(st["s01e02a"].transcript)
    assert [w.text for w in words] == ["Hey", "I'm", 'say "hi"', ""]
    assert words[1].onset == pytest.approx(0.9) and words[1].offset == pytest.approx(1.1)
    assert rel.target_samples("sub-02", "ood") == {"chaplin1": 4}
    assert split_stimuli(rel, cfg16, "train") == ["figures01", "s01e02a"]
    assert split_stimuli(rel, cfg16, "test") == ["chaplin1", "s07e01a"]
    assert [(r.subject, r.key) for r in split_runs(rel, cfg16, "val")] == [
        ("sub-01", "ses-011_task-s06e01a"), ("sub-03", "ses-011_task-s06e01a"), ("sub-05", "ses-011_task-s06e01a")]
    with MediaReader(st["s01e02a"].video) as m:
        a = m.audio(1.0, 2.0)
        assert a.shape == (16000,) and a.dtype == np.float32
        assert 0.2 < np.abs(a).max() < 0.3  # 8000 / 32768, both channels equal
        assert m.frames_at([0.0, 5.0]).shape == (2, 32, 48, 3)
    with MediaReader(st["figures01"].video) as m:
        assert m.audio(0, 1, rate=8000).shape == (8000,)
        assert m.frames_at([1.0]).shape == (1, 30, 40, 3)


def test_presets_say_whether_their_data_is_synthetic():
    assert load_config("demo").data.synthetic is True
    assert load_config("paper").data.synthetic is False


@pytest.mark.parametrize("preset, extra", [("paper", ["ray.address="]), ("demo", ["data.synthetic=false"])])
def test_local_sweep_without_a_dataset_is_an_error_unless_the_data_is_synthetic(tmp_path, monkeypatch, preset, extra):
    """A mistyped data.root is named, and nothing is written there (no synthetic data to train on)."""
    from mirage.pipeline.inputs import ensure_inputs
    from mirage.config import resolve_paths
    from mirage.errors import DataError

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    typo = tmp_path / "algonuats"
    cfg = resolve_paths(load_config(preset, [f"outputs={tmp_path / 'out'}", f"data.root={typo}", *extra]))
    hint = r"point it to the release with --set data.root=<path>, or set data.synthetic=true"
    with pytest.raises(DataError, match=rf"data.root={typo}: does not exist \(expected fmri/ and stimuli/.*{hint}"):
        ensure_inputs(cfg)
    assert not typo.exists()
    typo.mkdir()
    with pytest.raises(DataError, match=rf"data.root={typo}: no dataset there.*{hint}"):
        ensure_inputs(cfg)
    assert list(typo.iterdir()) == []


def test_sweep_cli_names_a_missing_data_root(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    typo = tmp_path / "nowhere"
    rc = main(["sweep", "--set", "data.synthetic=false", "--set", f"outputs={tmp_path / 'out'}",
               "--set", f"data.root={typo}"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith(f"mirage: error: data.root={typo}: does not exist") and "Traceback" not in err
    assert not typo.exists()
