"""Pure pieces of the data layer: windows, splits, names, z-scoring, length reconciliation, transcripts."""

from __future__ import annotations

import numpy as np
import pytest

from mirage.config import ConfigError, load_config
from mirage.data.fmri import reconcile_lengths, stimulus_trs, zscore
from mirage.data.layout import Release, group_of, parse_fmri_key, source_of, stimulus_paths
from mirage.data.splits import split_runs, split_stimuli
from mirage.data.transcripts import Word, chunk_words, read_rows, write_transcript
from mirage.data.windows import make_windows, n_feature_frames, slice_padded, window_frames, windows_for_prediction
from mirage.errors import DataError


@pytest.fixture
def paper():
    return load_config("paper").data


def test_paper_windows(paper):
    assert window_frames(paper, 2.0) == 298
    ws = make_windows(250, paper, 2.0, n_feature_frames(250 * 1.49, 2.0))
    assert [(w.tr_start, w.tr_stop, w.n_valid) for w in ws] == [(0, 100, 100), (100, 200, 100), (200, 300, 50)]
    assert [w.frame_start for w in ws] == [-9, 289, 587]  # 3 TRs (4.47 s) before each window
    assert all(w.frame_stop - w.frame_start == 298 for w in ws)
    assert ws[-1].mask.tolist() == [True] * 50 + [False] * 50


@pytest.mark.parametrize("window,stride,delay,rate", [(8, 8, 3, 2.0), (8, 4, 0, 2.0), (5, 3, 2, 1.5), (16, 16, 3, 4.0)])
def test_windows_follow_config(paper, window, stride, delay, rate):
    cfg = paper.model_copy(update={"window_trs": window, "stride_trs": stride, "hrf_delay_trs": delay})
    ws = make_windows(37, cfg, rate, 100)
    assert [w.tr_start for w in ws] == list(range(0, 37, stride))
    for w in ws:
        t0 = (w.tr_start - delay) * cfg.tr  # window start in stimulus time
        assert abs(w.frame_start / rate - t0) <= 0.5 / rate  # frame i holds cutoff (i + 1) / rate
        assert w.frame_stop - w.frame_start == round(window * cfg.tr * rate)
        assert w.n_valid == min(window, 37 - w.tr_start) == int(w.mask.sum())


@pytest.mark.parametrize("n_trs", [1, 7, 8, 9, 100, 257])
def test_prediction_windows_cover_every_tr_once(paper, n_trs):
    cfg = paper.model_copy(update={"window_trs": 8, "stride_trs": 3})
    counts = np.zeros(n_trs, int)
    for w in windows_for_prediction(n_trs, cfg, 2.0, 1000):
        counts[np.arange(w.tr_start, w.tr_stop)[w.mask]] += 1
    assert (counts == 1).all()
    assert make_windows(0, cfg, 2.0, 0) == []


def test_feature_frames_and_padding():
    assert n_feature_frames(40.0, 2.0) == 80
    assert n_feature_frames(40.064, 2.0) == 81
    assert n_feature_frames(0.2, 2.0) == 1
    x = np.arange(10.0).reshape(5, 2)
    out = slice_padded(x, -2, 4)
    assert out.shape == (6, 2) and (out[:2] == 0).all() and (out[2:] == x[:4]).all()
    assert (slice_padded(x, 3, 8)[2:] == 0).all()


def test_zscore_per_parcel():
    rng = np.random.default_rng(0)
    x = rng.normal(5.0, 3.0, (50, 4))
    x[:, 2] = 7.0
    z = zscore(x)
    assert z.dtype == np.float32
    np.testing.assert_allclose(z[:, [0, 1, 3]].mean(axis=0), 0, atol=1e-6)
    np.testing.assert_allclose(z[:, [0, 1, 3]].std(axis=0, ddof=1), 1, atol=1e-5)  # the sample std, as the reference
    from scipy.stats import zscore as scipy_zscore

    np.testing.assert_allclose(z[:, [0, 1, 3]], scipy_zscore(x[:, [0, 1, 3]], axis=0, ddof=1), atol=1e-5)
    assert (z[:, 2] == 0).all()


def test_reconcile_lengths():
    assert stimulus_trs(40.0, 1.49) == 27 and stimulus_trs(1.49 * 3, 1.49) == 3
    r = reconcile_lengths(29, 40.0, 1.49, 2)
    assert (r.n_trs, r.n_stimulus_trs, r.diff_trs) == (29, 27, 2)
    with pytest.raises(DataError, match=r"f.h5: key 'k'.*30 TRs.*\+3.*max_length_mismatch_trs"):
        reconcile_lengths(30, 40.0, 1.49, 2, where="f.h5: key 'k'")


def test_names():
    assert parse_fmri_key("ses-001_task-life01_run-2") == ("life01", 2)
    assert parse_fmri_key("ses-035_task-s02e19a") == ("s02e19a", None)
    with pytest.raises(DataError, match="'bogus'"):
        parse_fmri_key("bogus")
    assert (source_of("s01e01a"), group_of("s01e01a")) == ("friends", "s1")
    assert (source_of("bourne01"), group_of("bourne01")) == ("movie10", "bourne")
    assert (source_of("chaplin1"), group_of("chaplin1")) == ("ood", "chaplin")
    v, t = stimulus_paths("wot2")
    assert str(v) == "stimuli/movies/ood/wot/task-wot2_video.mkv" and str(t) == "stimuli/transcripts/ood/wot/ood_wot2.tsv"


def test_splits_from_selectors(synth_root, test_cfg):
    rel = Release(synth_root)
    cfg = test_cfg.data
    assert split_stimuli(rel, cfg, "val") == ["s06e01a", "s06e01b"]
    runs = split_runs(rel, cfg, "train")
    assert {r.stimulus_id for r in runs} == {"s01e01a", "s01e01b", "life01"}
    assert [r.subject for r in runs] == sorted(r.subject for r in runs)  # subject by subject
    custom = cfg.model_copy(update={"train": ["movie10:life", "friends:s01e01a"]})
    assert {r.key for r in split_runs(rel, custom, "train") if r.subject == "sub-01"} == {
        "ses-001_task-s01e01a", "ses-001_task-life01_run-1", "ses-002_task-life01_run-2"}
    bad = cfg.model_copy(update={"val": ["friendz:s6"]})
    with pytest.raises(ConfigError, match=r"data.val: selector 'friendz:s6'"):
        split_stimuli(rel, bad, "val")


def test_transcript_chunks_and_round_trip(tmp_path):
    words = [Word("a", 0.1, 0.5), Word("b", 1.3, 1.6), Word("c", 2.9, 3.1)]
    rows = chunk_words(words, 1.49, 4)
    assert [[w.text for w in r] for r in rows] == [["a"], ["b"], ["c"], []]  # chunk where the word ends
    path = tmp_path / "t.tsv"
    write_transcript(path, rows)
    back = read_rows(path)
    assert [[(w.text, w.onset, round(w.offset, 3)) for w in r] for r in back] == [
        [("a", 0.1, 0.5)], [("b", 1.3, 1.6)], [("c", 2.9, 3.1)], []]
