"""Response forms of the Serve API without a server: Accept negotiation and binary bodies (no Ray)."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pytest

from mirage.distributed.serve_api import (
    ARROW_MEDIA_TYPE,
    JSON_MEDIA_TYPE,
    NPY_MEDIA_TYPE,
    REPRESENTATIONS,
    HTTPError,
    Representation,
    encode_prediction,
    negotiate,
)

F16_RTOL, F16_ATOL = 2.0**-11, 2.0**-24  # half a float16 ulp, relative for normals and absolute for subnormals


@pytest.mark.parametrize(
    "accept, want",
    [
        (None, Representation(JSON_MEDIA_TYPE)),
        ("", Representation(JSON_MEDIA_TYPE)),
        ("*/*", Representation(JSON_MEDIA_TYPE)),
        ("application/*", Representation(JSON_MEDIA_TYPE)),
        ("application/json; charset=utf-8", Representation(JSON_MEDIA_TYPE)),
        ("text/html, */*;q=0.1", Representation(JSON_MEDIA_TYPE)),
        ("application/x-npy", Representation(NPY_MEDIA_TYPE, "float32")),
        ("APPLICATION/X-NPY", Representation(NPY_MEDIA_TYPE, "float32")),
        ("application/x-npy; dtype=float16", Representation(NPY_MEDIA_TYPE, "float16")),
        ('application/x-npy;dtype="float16";q=0.9, application/json;q=0.5', Representation(NPY_MEDIA_TYPE, "float16")),
        ("application/json;q=0.4, application/x-npy;q=0.5", Representation(NPY_MEDIA_TYPE, "float32")),
        ("application/x-npy;dtype=float32;q=0, application/x-npy", Representation(NPY_MEDIA_TYPE, "float16")),
        ("*/*;q=0.2, application/json;q=0", Representation(NPY_MEDIA_TYPE, "float32")),
        (ARROW_MEDIA_TYPE, Representation(ARROW_MEDIA_TYPE, "float32")),
        (ARROW_MEDIA_TYPE + ";dtype=float16", Representation(ARROW_MEDIA_TYPE, "float16")),
    ],
)
def test_accept_picks_the_preferred_offer(accept, want):
    assert negotiate(accept) == want


@pytest.mark.parametrize(
    "accept", ["text/html", "image/png, text/*", "application/x-npy;dtype=float64", "*/*;q=0", "nonsense"]
)
def test_an_unsupported_accept_is_406_naming_the_offers(accept):
    with pytest.raises(HTTPError) as e:
        negotiate(accept)
    assert e.value.status == 406
    assert accept in e.value.message
    for rep in REPRESENTATIONS:
        assert rep.describe() in e.value.message


@pytest.mark.parametrize("q", ["abc", "1.5", "-0.1"])
def test_a_bad_quality_is_400(q):
    with pytest.raises(HTTPError, match="expected a number from 0 to 1") as e:
        negotiate(f"application/x-npy;q={q}")
    assert e.value.status == 400


def _result(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    pred = (rng.standard_normal((13, 37)) * np.logspace(-6, 3, 37)).astype(np.float32)  # (n_trs, n_parcels)
    return {"subject": "sub-01", "stimulus": "s07e01a", "shape": list(pred.shape), "predictions": pred}


def test_json_carries_the_float32_predictions_exactly():
    result = _result()
    body, headers = encode_prediction(result, Representation(JSON_MEDIA_TYPE))
    got = json.loads(body)
    assert headers["content-type"] == JSON_MEDIA_TYPE
    assert {k: got[k] for k in ("subject", "stimulus", "shape")} == {"subject": "sub-01", "stimulus": "s07e01a", "shape": [13, 37]}
    np.testing.assert_array_equal(np.asarray(got["predictions"], np.float32), result["predictions"])


def _decode(body: bytes, media_type: str) -> tuple[np.ndarray, dict]:
    if media_type == NPY_MEDIA_TYPE:
        return np.load(io.BytesIO(body), allow_pickle=False), {}
    table = pa.ipc.open_stream(body).read_all()
    col = table.column("predictions").combine_chunks()
    arr = col.flatten().to_numpy().reshape(len(col), col.type.list_size)
    return arr, {k.decode(): v.decode() for k, v in table.schema.metadata.items()}


@pytest.mark.parametrize("media_type", [NPY_MEDIA_TYPE, ARROW_MEDIA_TYPE])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_binary_bodies_decode_to_the_json_numbers(media_type, dtype):
    result = _result(1)
    from_json = np.asarray(json.loads(encode_prediction(result, Representation(JSON_MEDIA_TYPE))[0])["predictions"], np.float32)
    body, headers = encode_prediction(result, Representation(media_type, dtype))
    arr, meta = _decode(body, media_type)
    assert arr.dtype == np.dtype(dtype) and arr.shape == (13, 37)
    assert headers["content-type"] == media_type and headers["vary"] == "Accept"
    fields = {"subject": "sub-01", "stimulus": "s07e01a", "shape": "13,37", "dtype": dtype}
    assert {k: headers[f"x-mirage-{k}"] for k in fields} == fields
    if media_type == ARROW_MEDIA_TYPE:
        assert meta == fields
    if dtype == "float32":
        np.testing.assert_array_equal(arr, from_json)
    else:
        np.testing.assert_allclose(arr.astype(np.float32), from_json, rtol=F16_RTOL, atol=F16_ATOL)
        assert not np.array_equal(arr.astype(np.float32), from_json)  # really rounded to float16


def test_a_binary_body_is_a_fraction_of_the_json():
    result = _result(2)
    sizes = {rep: len(encode_prediction(result, rep)[0]) for rep in REPRESENTATIONS}
    n = result["predictions"].size
    assert sizes[Representation(NPY_MEDIA_TYPE, "float32")] < 4 * n + 200
    assert sizes[Representation(NPY_MEDIA_TYPE, "float16")] < 2 * n + 200
    assert sizes[Representation(JSON_MEDIA_TYPE)] > 2 * sizes[Representation(NPY_MEDIA_TYPE, "float32")]
