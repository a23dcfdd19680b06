"""A release as DataLad leaves it: every file a symlink into the git-annex object store; the files
not fetched point to objects that are absent. Fetched ones read as files; unfetched ones are an
error naming them and the fetch command, never skipped."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from mirage.cli import main as cli_main
from mirage.data.check import check_dataset
from mirage.data.layout import Release
from mirage.errors import DataError

FETCH = r"datalad get .*git annex get"


@pytest.fixture
def annexed(synth_root, tmp_path) -> Path:
    """The test dataset with each movie, transcript, h5 and target file a relative symlink to its
    object under ``.git/annex/objects`` (what ``datalad get`` leaves)."""
    root = tmp_path / "release"
    shutil.copytree(synth_root, root, ignore=shutil.ignore_patterns("_truth"))
    objects = root / ".git" / "annex" / "objects"
    for i, path in enumerate(sorted(p for p in root.rglob("*") if p.is_file() and ".git" not in p.parts)):
        obj = objects / f"{i:03d}" / path.name
        obj.parent.mkdir(parents=True)
        path.rename(obj)
        path.symlink_to(os.path.relpath(obj, path.parent))
    return root


def _unfetch(link: Path) -> str:
    """Drop the content of an annexed file (``datalad drop``); returns its path in the release."""
    assert link.is_symlink()
    link.resolve().unlink()
    return str(link)


def test_fetched_symlinks_read_as_files(annexed, synth_root):
    release, plain = Release(annexed), Release(synth_root)
    assert sorted(release.stimuli()) == sorted(plain.stimuli())
    for st in release.stimuli().values():
        assert st.video.is_symlink() and (st.transcript is not None) == (st.group != "chaplin"), st.id
    assert release.subjects() == plain.subjects() and release.unfetched() == []
    run = release.fmri_runs("sub-01")[0]
    assert run.path.is_symlink() and len(release.fmri_runs("sub-01")) == len(plain.fmri_runs("sub-01"))
    assert release.target_samples("sub-01", "ood") == plain.target_samples("sub-01", "ood")


def test_unfetched_movie_is_an_error_naming_it_and_the_fetch_command(annexed):
    rel = "stimuli/movies/movie10/life/life01.mkv"
    _unfetch(annexed / rel)
    with pytest.raises(DataError, match=rf"1 dataset file\(s\) are broken symlinks.*{rel}.*{FETCH} {rel}"):
        Release(annexed).stimuli()


def test_unfetched_transcript_is_an_error_not_an_empty_text_input(annexed):
    rel = "stimuli/transcripts/friends/s1/friends_s01e01a.tsv"
    _unfetch(annexed / rel)
    with pytest.raises(DataError, match=rf"{rel}.*{FETCH}"):
        Release(annexed).stimuli()


def test_unfetched_fmri_is_an_error_not_a_missing_subject(annexed):
    func = annexed / "fmri" / "sub-03" / "func"
    h5 = sorted(func.iterdir())[0]
    _unfetch(h5)
    rel = str(h5.relative_to(annexed))
    for call in (lambda r: r.subjects(), lambda r: r.fmri_files("sub-03"), lambda r: r.fmri_runs("sub-03")):
        with pytest.raises(DataError, match=rf"{rel}.*{FETCH}"):
            call(Release(annexed))
    assert len(Release(annexed).fmri_runs("sub-01")) > 0  # other subjects' files still read


def test_unfetched_target_samples_is_an_error_naming_the_fetch(annexed):
    rel = "fmri/sub-02/target_sample_number/sub-02_ood_fmri_samples.npy"
    _unfetch(annexed / rel)
    with pytest.raises(DataError, match=rf"{rel}.*{FETCH}"):
        Release(annexed).target_samples("sub-02", "ood")


def test_many_unfetched_files_name_the_first_few_and_their_folders(annexed):
    movies = sorted((annexed / "stimuli" / "movies").rglob("*.mkv"))
    for m in movies:
        _unfetch(m)
    with pytest.raises(DataError) as e:
        Release(annexed).stimuli()
    msg = str(e.value)
    assert f"{len(movies)} dataset file(s)" in msg and f"and {len(movies) - 5} more" in msg
    named = [m for m in movies if str(m.relative_to(annexed)) in msg]
    assert len(named) == 5
    assert "datalad get stimuli/movies/friends/s1 " in msg  # folders to fetch, not a list of 11 files


def test_check_reports_unfetched_files_and_the_cli_exits_1(annexed, test_cfg, capsys):
    movie = "stimuli/movies/ood/chaplin/task-chaplin1_video.mkv"
    h5 = str(sorted((annexed / "fmri" / "sub-01" / "func").iterdir())[0].relative_to(annexed))
    _unfetch(annexed / movie)
    _unfetch(annexed / h5)
    rep = check_dataset(annexed, test_cfg.data)
    assert not rep["ok"] and len(rep["errors"]) == 1
    assert movie in rep["errors"][0] and h5 in rep["errors"][0] and "datalad get" in rep["errors"][0]
    code = cli_main(["data", "check", str(annexed), "--set", f"data.n_parcels={test_cfg.data.n_parcels}"])
    assert code == 1 and movie in capsys.readouterr().err


def test_extract_refuses_a_release_with_unfetched_movies(annexed, test_cfg, tmp_path, capsys):
    rel = "stimuli/movies/friends/s7/friends_s07e01b.mkv"
    _unfetch(annexed / rel)
    store = tmp_path / "features"
    code = cli_main(["extract", "--local", "--set", f"data.root={annexed}", "--set", f"features.store={store}",
                     "--set", f"outputs={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("mirage: error: ") and rel in err and "datalad get" in err
    assert not store.exists()  # the failed run left no empty store behind
    np.testing.assert_equal(Release(annexed).unfetched(), [annexed / rel])
