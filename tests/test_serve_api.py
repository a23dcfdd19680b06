"""Request parsing of the Serve API without a server: JSON bodies, strict fields, messages (no Ray)."""

from __future__ import annotations

import pytest

from mirage.distributed.serve_api import FeaturesQuery, HTTPError, PredictRequest, parse_json_object, redact, validate

FIELDS = list(PredictRequest.model_fields)


@pytest.mark.parametrize(
    "body, words",
    [
        (b'{"n_trs": ' + b"1" * 5000 + b"}", "5000 digits"),
        (b'{"n_trs": -' + b"9" * 19 + b"}", "19 digits"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"n_trs": NaN}', "NaN is not JSON"),
        (b'{"n_trs": -Infinity}', "-Infinity is not JSON"),
        (b"\xff\xfe\x00", "not valid JSON"),
        (b'{"n_trs": \xd9\xa3}', "not valid JSON"),  # an Arabic-Indic digit is no JSON number
        (b"[1, 2]", "JSON list"),
    ],
)
def test_bodies_that_cannot_be_parsed_safely_are_400(body, words):
    with pytest.raises(HTTPError, match=words) as e:
        parse_json_object(body, FIELDS)
    assert e.value.status == 400


@pytest.mark.parametrize(
    "value, words",
    [
        ({"subject": "sub-01", "stimulus": "s", "n_trs": "\u0663"}, "n_trs: Input should be a valid integer"),
        ({"subject": "sub-01", "stimulus": "s", "n_trs": True}, "n_trs"),
        ({"subject": "sub-01", "stimulus": "s", "n_trs": 2.0}, "n_trs"),
        ({"subject": "sub-01", "stimulus": "s", "n_trs": 0}, "n_trs: Input should be greater than or equal to 1"),
        ({"subject": "sub-01"}, "stimulus: required"),
        ({"subject": "sub-01", "stimulus": "s", "x": 1}, "x: unknown field; expected one of ['subject', 'stimulus', 'n_trs']"),
    ],
)
def test_predict_requests_are_strict(value, words):
    with pytest.raises(HTTPError) as e:
        validate(PredictRequest, value)
    assert e.value.status == 422 and words in e.value.message


@pytest.mark.parametrize("n_trs", ["\u0663", "\u00b2", "+5", "1_000", " 12", "12.0", "1" * 10, "-3"])
def test_query_integers_are_ascii_digits_only(n_trs):
    with pytest.raises(HTTPError, match="ASCII digits"):
        validate(FeaturesQuery, {"subject": "sub-01", "n_trs": n_trs})
    assert validate(FeaturesQuery, {"subject": "sub-01", "n_trs": "460"}).n_trs == 460


def test_redact_hides_server_directories():
    msg = "/srv/store/tiny-abc/s01.npy: unreadable; /srv/store-old too; model /models/m1/model.safetensors"
    out = redact(msg, ["/srv/store/", "/models/m1", "", "/"])
    assert out == "<server>/tiny-abc/s01.npy: unreadable; <server>-old too; model <server>/model.safetensors"
