"""Algonauts submission files: the official format, portability to numpy < 2, the scoring rule."""

from __future__ import annotations

import io
import pickle
import zipfile

import numpy as np
import pytest
from scipy.stats import pearsonr

from mirage.errors import DataError
from mirage.submission import (
    npy_bytes,
    read_predictions,
    read_submission,
    score_predictions,
    write_predictions,
    write_submission,
)

TARGETS = {"sub-01": {"chaplin1": 30, "chaplin2": 25, "wot1": 20}, "sub-02": {"chaplin1": 30, "chaplin2": 25, "wot1": 20}}


def _preds(targets=TARGETS, parcels=7, seed=0):
    rng = np.random.default_rng(seed)
    return {s: {k: rng.standard_normal((n, parcels)).astype(np.float64) for k, n in c.items()} for s, c in targets.items()}


class _OfficialUnpickler(pickle.Unpickler):
    """What numpy 1.x can resolve: anything under numpy._core (numpy >= 2 only) fails here."""

    ALLOWED = {("numpy", "array"), ("numpy", "ndarray"), ("builtins", "bytearray")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} would not load under numpy < 2")
        return super().find_class(module, name)


def load_official(path):
    """Follows the official format: one .npy in the zip, np.load(allow_pickle=True).item(), dict of dicts."""
    with zipfile.ZipFile(path) as zf:
        (name,) = zf.namelist()
        raw = zf.read(name)
    assert name in ("fmri_predictions_friends_s7.npy", "fmri_predictions_ood.npy")
    version = np.lib.format.read_magic(io.BytesIO(raw))
    fp = io.BytesIO(raw)
    np.lib.format.read_magic(fp)
    header = np.lib.format.read_array_header_1_0(fp) if version == (1, 0) else np.lib.format.read_array_header_2_0(fp)
    assert header == ((), False, np.dtype("O"))
    portable = _OfficialUnpickler(fp).load()
    data = np.load(io.BytesIO(raw), allow_pickle=True).item()
    assert isinstance(data, dict) and portable.item().keys() == data.keys()
    for sub, chunks in data.items():
        assert sub.startswith("sub-0") and isinstance(chunks, dict)
        for key, arr in chunks.items():
            assert isinstance(arr, np.ndarray) and arr.dtype == np.float32 and arr.ndim == 2
            assert np.isfinite(arr).all()
            np.testing.assert_array_equal(portable.item()[sub][key], arr)
    return name, data


def test_submission_round_trip_in_the_official_format(tmp_path):
    preds = _preds()
    path = write_submission(preds, "ood", tmp_path, TARGETS)
    assert path.name == "fmri_predictions_ood.zip"
    name, data = load_official(path)
    assert name == "fmri_predictions_ood.npy"
    for s, chunks in TARGETS.items():
        for k, n in chunks.items():
            assert data[s][k].shape == (n, 7)
            np.testing.assert_array_equal(data[s][k], preds[s][k].astype(np.float32))
    split, again = read_submission(path)
    assert split == "ood" and again.keys() == data.keys()
    assert not list(tmp_path.glob("*.tmp"))


def test_the_plain_numpy2_pickle_is_what_the_portable_writer_avoids():
    arr = np.zeros((2, 3), np.float32)
    plain = pickle.dumps(np.array({"sub-01": {"x": arr}}, dtype=object), protocol=3)
    with pytest.raises(pickle.UnpicklingError, match="numpy"):
        _OfficialUnpickler(io.BytesIO(plain)).load()
    raw = npy_bytes({"sub-01": {"x": arr}})
    fp = io.BytesIO(raw)
    np.lib.format.read_magic(fp)
    np.lib.format.read_array_header_1_0(fp)
    assert _OfficialUnpickler(fp).load().item()["sub-01"]["x"].shape == (2, 3)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda p: p.pop("sub-02"), "missing"),
        (lambda p: p.__setitem__("sub-09", p["sub-01"]), "unexpected"),
        (lambda p: p["sub-01"].pop("wot1"), "missing"),
        (lambda p: p["sub-01"].__setitem__("wot9", np.zeros((3, 7))), "unexpected"),
        (lambda p: p["sub-01"].__setitem__("wot1", np.zeros((19, 7))), "shape"),
        (lambda p: p["sub-01"].__setitem__("wot1", np.zeros((20, 6))), "parcels"),
        (lambda p: p["sub-01"].__setitem__("wot1", np.full((20, 7), np.nan)), "finite"),
        (lambda p: p["sub-01"].__setitem__("wot1", np.zeros((20,))), "shape"),
    ],
)
def test_invalid_predictions_are_refused_before_writing(tmp_path, mutate, match):
    preds = _preds()
    mutate(preds)
    with pytest.raises(DataError, match=match):
        write_submission(preds, "ood", tmp_path, TARGETS)
    assert not list(tmp_path.iterdir())


def test_unknown_split_and_broken_zips(tmp_path):
    with pytest.raises(DataError, match="split"):
        write_submission(_preds(), "s8", tmp_path, TARGETS)
    bad = tmp_path / "two.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("fmri_predictions_ood.npy", b"x")
        zf.writestr("extra.npy", b"y")
    with pytest.raises(DataError, match="exactly one"):
        read_submission(bad)
    (tmp_path / "nozip.zip").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a zip"):
        read_submission(tmp_path / "nozip.zip")


def test_ood_score_follows_the_official_rule():
    rng = np.random.default_rng(1)
    targets = {s: {k: rng.standard_normal((n, 5)) for k, n in c.items()} for s, c in TARGETS.items()}
    preds = {s: {k: t + rng.standard_normal(t.shape) * 0.5 for k, t in c.items()} for s, c in targets.items()}
    got = score_predictions(preds, targets, "ood")
    for s in TARGETS:
        per_movie = []
        for movie, keys in (("chaplin", ["chaplin1", "chaplin2"]), ("wot", ["wot1"])):
            p = np.concatenate([preds[s][k][5:-5] for k in keys])
            t = np.concatenate([targets[s][k][5:-5] for k in keys])
            r = np.mean([pearsonr(p[:, j], t[:, j])[0] for j in range(5)])
            assert got[f"{s}/{movie}"] == pytest.approx(r, abs=1e-6)
            per_movie.append(r)
        assert got[s] == pytest.approx(np.mean(per_movie), abs=1e-6)
    assert got["score"] == pytest.approx(np.mean([got[s] for s in TARGETS]), abs=1e-9)
    assert 0.6 < got["score"] < 1.0
    assert score_predictions(targets, targets, "ood")["score"] == pytest.approx(1.0)
    shuffled = {s: {k: rng.standard_normal(t.shape) for k, t in c.items()} for s, c in targets.items()}
    assert abs(score_predictions(shuffled, targets, "ood")["score"]) < 0.2


S7 = {"sub-01": {"s07e01a": 40, "s07e01b": 35, "s07e02a": 30}, "sub-03": {"s07e01a": 40, "s07e01b": 35, "s07e02a": 30}}


def _exact_inside_noise_at_edges(edge=5, parcels=6, seed=4):
    rng = np.random.default_rng(seed)
    targets = {s: {k: rng.standard_normal((n, parcels)) for k, n in c.items()} for s, c in S7.items()}
    preds = {}
    for s, c in targets.items():
        for k, t in c.items():
            p = t.copy()
            p[:edge] = rng.standard_normal((edge, parcels)) * 10
            p[-edge:] = rng.standard_normal((edge, parcels)) * 10
            preds.setdefault(s, {})[k] = p
    return preds, targets


@pytest.mark.parametrize("split", ["friends-s7", "val"])
def test_friends_score_drops_five_trs_at_both_edges_of_every_episode_chunk(split):
    """Exact inside, noise in the first and last 5 TRs of every chunk: 1.0 only with the edge rule."""
    preds, targets = _exact_inside_noise_at_edges()
    got = score_predictions(preds, targets, split)
    assert got["score"] == pytest.approx(1.0, abs=1e-12)
    assert set(got) == {"score", "sub-01", "sub-03", "sub-01/s07", "sub-03/s07"}  # one group: the season
    # without the rule (all TRs concatenated) the edge noise costs: checked against scipy
    for s in S7:
        p = np.concatenate([preds[s][k] for k in sorted(S7[s])])
        t = np.concatenate([targets[s][k] for k in sorted(S7[s])])
        assert np.mean([pearsonr(p[:, j], t[:, j])[0] for j in range(p.shape[1])]) < 0.6
    # noise one TR inside the kept range is not forgiven
    preds["sub-01"]["s07e01b"][5] += 100.0
    assert score_predictions(preds, targets, split)["score"] < 0.99
    with pytest.raises(DataError, match="split"):
        score_predictions(preds, targets, "s8")


def test_friends_edge_rule_matches_the_official_concatenation_with_scipy():
    rng = np.random.default_rng(5)
    targets = {s: {k: rng.standard_normal((n, 4)) for k, n in c.items()} for s, c in S7.items()}
    preds = {s: {k: t + rng.standard_normal(t.shape) for k, t in c.items()} for s, c in targets.items()}
    got = score_predictions(preds, targets, "friends-s7")
    for s in S7:
        p = np.concatenate([preds[s][k][5:-5] for k in S7[s]])
        t = np.concatenate([targets[s][k][5:-5] for k in S7[s]])
        assert got[s] == pytest.approx(np.mean([pearsonr(p[:, j], t[:, j])[0] for j in range(4)]), abs=1e-9)


def test_a_single_npy_of_any_name_is_read(tmp_path):
    preds = _preds(S7)
    path = write_submission(preds, "friends-s7", tmp_path, S7)
    with zipfile.ZipFile(path) as zf:
        raw = zf.read("fmri_predictions_friends_s7.npy")
    ood = _preds()
    cases = (("team_x.npy", "friends-s7", raw, preds), ("sub/dir/preds.npy", "ood", npy_bytes(ood), ood))
    for name, split, data, want in cases:
        other = tmp_path / f"{split}-renamed.zip"
        with zipfile.ZipFile(other, "w") as zf:
            zf.writestr(name, data)
        got_split, back = read_submission(other)
        assert got_split == split
        assert {s: set(c) for s, c in back.items()} == {s: set(c) for s, c in want.items()}
        key = sorted(want["sub-01"])[0]
        np.testing.assert_allclose(back["sub-01"][key], want["sub-01"][key], rtol=1e-6)
    not_npy = tmp_path / "txt.zip"
    with zipfile.ZipFile(not_npy, "w") as zf:
        zf.writestr("preds.txt", raw)
    with pytest.raises(DataError, match="exactly one file, a .npy"):
        read_submission(not_npy)
    empty = tmp_path / "empty.zip"
    zipfile.ZipFile(empty, "w").close()
    with pytest.raises(DataError, match="exactly one"):
        read_submission(empty)
    junk = tmp_path / "junk.zip"
    with zipfile.ZipFile(junk, "w") as zf:
        zf.writestr("x.npy", b"not an npy")
    with pytest.raises(DataError, match="not a readable .npy"):
        read_submission(junk)


def test_val_predictions_file_round_trip(tmp_path):
    preds = _preds(seed=3)
    path = write_predictions(preds, tmp_path / "p.npz")
    back = read_predictions(path)
    for s, c in preds.items():
        for k, a in c.items():
            np.testing.assert_array_equal(back[s][k], a.astype(np.float32))
    (tmp_path / "bad.npz").write_bytes(b"junk")
    with pytest.raises(DataError):
        read_predictions(tmp_path / "bad.npz")


class _RunsCode:
    """A pickle payload that would create a file when unpickled by a plain ``np.load``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_a_crafted_pickle_is_refused_without_running_code(tmp_path):
    import io
    import zipfile

    from mirage.errors import DataError
    from mirage.submission import read_submission

    marker = tmp_path / "ran"
    payload = np.empty((), dtype=object)
    payload[()] = {"sub-01": {"s07e01a": _RunsCode(marker)}}
    buf = io.BytesIO()
    np.save(buf, payload, allow_pickle=True)
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("fmri_predictions_friends_s7.npy", buf.getvalue())
    with pytest.raises(DataError, match="refusing to load"):
        read_submission(evil)
    assert not marker.exists()
    # the same bytes through a plain unpickling load do run it: the payload is a real one
    np.load(io.BytesIO(buf.getvalue()), allow_pickle=True)
    assert marker.exists()


def test_an_oversized_submission_is_refused_before_reading(tmp_path):
    import zipfile

    from mirage.errors import DataError
    from mirage.submission import read_submission

    big = tmp_path / "big.zip"
    with zipfile.ZipFile(big, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("fmri_predictions_ood.npy", b"\0" * (1 << 20))  # 1 MiB of zeros, ~1 KB compressed
    with pytest.raises(DataError, match="bytes uncompressed, expected at most 65536"):
        read_submission(big, max_bytes=1 << 16)
