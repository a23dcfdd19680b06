"""Feature bodies (.npy / .npz) are sized from their headers before anything is inflated (no Ray)."""

from __future__ import annotations

import io
import time
import tracemalloc
import zipfile

import numpy as np
import pytest

from mirage.errors import DataError, PayloadError, PayloadTooLargeError
from mirage.payload import FeatureSpec, read_features

SPEC = FeatureSpec(n_modalities=3, min_layers=2, dim=8)
LIMIT = 1 << 20  # 1 MiB


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def npy_header(shape, descr="<f4") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue()


def zip_bomb(shape, descr="<f4") -> bytes:
    """An npz whose ``features.npy`` honestly inflates to a zero array of ``shape`` (written in 1 MiB chunks)."""
    buf = io.BytesIO()
    left = int(np.prod(shape)) * np.dtype(descr).itemsize
    chunk = bytes(1 << 20)
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z, z.open("features.npy", "w", force_zip64=True) as f:
        f.write(npy_header(shape, descr))
        while left:
            f.write(chunk[: min(left, len(chunk))])
            left -= min(left, len(chunk))
    return buf.getvalue()


def stored_npz(member: bytes, name: str = "features.npy") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(name, member)
    return buf.getvalue()


def features(n_frames=10, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n_frames, 3, 2, 8)).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, ">f4"])
def test_npy_and_npz_bodies_round_trip(dtype):
    x = features(dtype=dtype)
    for body in (npy_bytes(x), npz_bytes(features=x, other=np.arange(3)), npy_bytes(np.asfortranarray(x))):
        got = read_features(body, SPEC, LIMIT)
        assert got.dtype.isnative and got.dtype.itemsize == np.dtype(dtype).itemsize
        np.testing.assert_array_equal(got, x)


def test_a_zip_bomb_is_refused_from_its_header_without_inflating():
    # 64 MiB of zeros in a ~64 KiB archive: a compression ratio of about 1000
    n_frames = (64 << 20) // (3 * 2 * 8 * 4)
    bomb = zip_bomb((n_frames, 3, 2, 8))
    assert len(bomb) < (1 << 20) // 4
    tracemalloc.start()
    t = time.perf_counter()
    with pytest.raises(PayloadTooLargeError, match=r"bytes uncompressed; expected at most 1048576"):
        read_features(bomb, SPEC, LIMIT)
    elapsed = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < LIMIT and elapsed < 1.0, (peak, elapsed)


@pytest.mark.parametrize("shape", [(10**9, 3, 2, 8), (2**40, 3, 2**20, 8)])
def test_a_header_declaring_a_huge_array_is_refused_before_allocation(shape):
    for body in (npy_header(shape) + bytes(64), stored_npz(npy_header(shape) + bytes(64))):
        with pytest.raises(PayloadTooLargeError, match="uncompressed"):
            read_features(body, SPEC, LIMIT)


def test_bodies_inconsistent_with_their_header_are_refused():
    x = npy_bytes(features())
    cases = [
        (x[:-4], "data bytes"),  # truncated npy
        (x + b"\0" * 4, "data bytes"),  # trailing bytes
        (stored_npz(x[:-4]), "declares"),  # member shorter than its header
        (stored_npz(x + b"\0" * 4), "declares"),
        (stored_npz(x, name="x.npy"), "named 'features'"),
        (b"PK\x03\x04garbage", "not an .npz"),
        (b"not an array", "neither .npy nor .npz"),
        (b"\x93NUMPY\x01\x00\xff\xff{", "header"),
    ]
    for body, words in cases:
        with pytest.raises(PayloadError, match=words):
            read_features(body, SPEC, LIMIT)
    # a corrupted compressed member fails its CRC instead of returning wrong numbers
    good = bytearray(npz_bytes(features=features()))
    good[len(good) // 3] ^= 0xFF
    with pytest.raises(PayloadError):
        read_features(bytes(good), SPEC, LIMIT)


@pytest.mark.parametrize(
    "arr, words",
    [
        (features().astype(np.float64), "dtype float64"),
        (features().astype(np.int32), "dtype int32"),
        (features()[:, :2], r"shape \(10, 2, 2, 8\)"),
        (features()[..., :7], "shape"),
        (features()[:, :, :1], "n_layers >= 2"),
        (features()[:0], "n_frames >= 1"),
        (features()[0], "shape"),
    ],
)
def test_arrays_that_are_not_the_models_features_are_refused_from_the_header(arr, words):
    for body in (npy_bytes(arr), npz_bytes(features=arr)):
        with pytest.raises(DataError, match=words):
            read_features(body, SPEC, LIMIT)


def test_object_arrays_never_unpickle():
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="dtype object"):
        read_features(buf.getvalue(), SPEC, LIMIT)
