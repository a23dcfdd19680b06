"""Feature arrays from request bodies, with every size known before anything is inflated, and
prediction arrays as binary response bodies.

A body is a raw ``.npy`` file or an ``.npz`` archive holding ``features.npy``. Before a
single array byte is read, the ``.npy`` header (and, for an archive, the member's declared
uncompressed size) gives shape and dtype; the array is refused when it is not
``(n_frames, 3, n_layers, dim)`` float16/float32 for the model, or when its bytes exceed the
limit. Reading then stops at the declared size, so a small archive cannot inflate past it.

Errors: :class:`~mirage.errors.PayloadError` (not an npy/npz, or inconsistent with its own
header), :class:`~mirage.errors.PayloadTooLargeError` (over the limit) and
:class:`~mirage.errors.DataError` (the array is not the model's features). No Ray here.

Responses: :func:`npy_body` (an ``.npy`` file, header plus the raw array, no pickle) and
:func:`arrow_body` (an Arrow IPC stream of one record batch) cost one copy of the array each.
"""

from __future__ import annotations

import io
import math
import zipfile
import zlib
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from mirage.errors import DataError, PayloadError, PayloadTooLargeError

NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK\x03\x04"
FEATURES_MEMBER = "features.npy"


@dataclass(frozen=True)
class FeatureSpec:
    """What a model reads: ``(n_frames >= 1, n_modalities, n_layers >= min_layers, dim)``."""

    n_modalities: int
    min_layers: int
    dim: int

    def describe(self) -> str:
        return f"(n_frames >= 1, {self.n_modalities}, n_layers >= {self.min_layers}, {self.dim}) float16/float32"


@dataclass(frozen=True)
class NpyHeader:
    """A parsed ``.npy`` header: shape, dtype, memory order and where the data starts."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    data_offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def read_npy_header(fp: BinaryIO, where: str) -> NpyHeader:
    """Parse the header at the start of ``fp`` (left positioned at the first data byte)."""
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except (ValueError, EOFError, OSError, SyntaxError) as e:
        raise PayloadError(f"{where}: not a readable .npy header ({e})") from None
    if any(not isinstance(d, int) or d < 0 for d in shape):
        raise PayloadError(f"{where}: .npy header declares shape {shape}; expected non-negative integers")
    return NpyHeader(tuple(shape), np.dtype(dtype), bool(fortran), fp.tell())


def check_features_header(header: NpyHeader, spec: FeatureSpec, max_bytes: int, where: str) -> None:
    """Refuse a declared array that is too large or not the model's features, before reading it."""
    if header.nbytes > max_bytes:
        raise PayloadTooLargeError(
            f"{where}: array {header.shape} {header.dtype} holds {header.nbytes} bytes uncompressed; "
            f"expected at most {max_bytes}"
        )
    dt = header.dtype
    if dt.kind != "f" or dt.itemsize not in (2, 4) or dt.hasobject:
        raise DataError(f"{where}: dtype {dt}, expected float16 or float32")
    s = header.shape
    if len(s) != 4 or s[0] < 1 or s[1] != spec.n_modalities or s[2] < spec.min_layers or s[3] != spec.dim:
        raise DataError(f"{where}: shape {s}, expected {spec.describe()}")


def read_features(body: bytes, spec: FeatureSpec, max_bytes: int) -> np.ndarray:
    """The features array of an ``.npy`` body or of ``features.npy`` in an ``.npz`` body.

    Args:
        body: the request body.
        spec: the shape the model reads.
        max_bytes: largest uncompressed array accepted.

    Returns:
        (n_frames, n_modalities, n_layers, dim) float16/float32 in native byte order.
    """
    if body.startswith(NPY_MAGIC):
        return _read_npy(body, spec, max_bytes)
    if body.startswith(ZIP_MAGIC):
        return _read_npz(body, spec, max_bytes)
    raise PayloadError(f"body of {len(body)} bytes is neither .npy nor .npz; expected one of them holding 'features'")


def _read_npy(body: bytes, spec: FeatureSpec, max_bytes: int) -> np.ndarray:
    fp = io.BytesIO(body)
    header = read_npy_header(fp, "npy body")
    check_features_header(header, spec, max_bytes, "npy body")
    if len(body) != header.data_offset + header.nbytes:
        raise PayloadError(
            f"npy body: {len(body) - header.data_offset} data bytes, its header declares {header.nbytes}"
        )
    return _read_data(fp, header, "npy body")


def _read_npz(body: bytes, spec: FeatureSpec, max_bytes: int) -> np.ndarray:
    where = f"npz member {FEATURES_MEMBER!r}"
    try:
        archive = zipfile.ZipFile(io.BytesIO(body))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError) as e:
        raise PayloadError(f"body is not an .npz file ({e})") from None
    with archive:
        try:
            info = archive.getinfo(FEATURES_MEMBER)
        except KeyError:
            names = sorted(n.removesuffix(".npy") for n in archive.namelist())
            raise PayloadError(f"npz holds {names[:20]}; expected an array named 'features'") from None
        if info.file_size > max_bytes + (1 << 16):
            raise PayloadTooLargeError(
                f"{where}: {info.file_size} bytes uncompressed; expected at most {max_bytes} (plus its header)"
            )
        try:
            with archive.open(info) as fp:
                header = read_npy_header(fp, where)
                check_features_header(header, spec, max_bytes, where)
                if info.file_size != header.data_offset + header.nbytes:
                    raise PayloadError(
                        f"{where}: {info.file_size} bytes uncompressed, its header declares "
                        f"{header.data_offset + header.nbytes}"
                    )
                return _read_data(fp, header, where)
        except (zipfile.BadZipFile, RuntimeError, NotImplementedError, zlib.error, EOFError, OSError) as e:
            raise PayloadError(f"{where}: unreadable ({e})") from None


def _read_data(fp: BinaryIO, header: NpyHeader, where: str) -> np.ndarray:
    """The array after a checked header: exactly ``header.nbytes`` bytes are read, never more."""
    buf = bytearray(header.nbytes)
    view, got = memoryview(buf), 0
    while got < len(buf):
        n = fp.readinto(view[got:])
        if not n:
            raise PayloadError(f"{where}: {got} data bytes, its header declares {header.nbytes}")
        got += n
    arr = np.frombuffer(buf, dtype=header.dtype).reshape(header.shape, order="F" if header.fortran_order else "C")
    return arr if arr.dtype.isnative else arr.astype(arr.dtype.newbyteorder("="))


# ---------------------------------------------------------------- responses


def npy_body(array: np.ndarray, dtype: str = "float32") -> bytes:
    """``array`` (n_rows, n_cols) as an ``.npy`` file of ``dtype`` (float32 or float16), C order, no pickle."""
    arr = np.ascontiguousarray(array, dtype=np.dtype(dtype).newbyteorder("<"))
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, np.lib.format.header_data_from_array_1_0(arr))
    return head.getvalue() + arr.tobytes()


def arrow_body(array: np.ndarray, dtype: str = "float32", metadata: dict[str, str] | None = None) -> bytes:
    """``array`` (n_rows, n_cols) as an Arrow IPC stream: one record batch, column ``predictions`` of
    ``n_rows`` fixed-size lists of ``n_cols`` ``dtype`` values; ``metadata`` in the schema."""
    import pyarrow as pa

    arr = np.ascontiguousarray(array, dtype=dtype)
    column = pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), arr.shape[1])
    batch = pa.record_batch([column], names=["predictions"], metadata=metadata)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()
