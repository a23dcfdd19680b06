"""JSON/YAML documents read whole: every failure is the caller's error class naming the file."""

from __future__ import annotations

import pytest

from mirage.documents import read_mapping
from mirage.errors import FeatureStoreError, ModelLoadError


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("a.json", "{\"x\": 1", r"a.json: not valid JSON"),
        ("a.yaml", "x: [1, 2\n", r"a.yaml: not valid YAML"),
        ("a.json", "[1, 2]", r"a.json: expected a mapping at the top level, got list"),
        ("a.yaml", "- 1\n", r"a.yaml: expected a mapping at the top level, got list"),
    ],
)
def test_bad_documents_raise_the_callers_error(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(ModelLoadError, match=message):
        read_mapping(tmp_path / name, ModelLoadError)


def test_missing_file_and_good_documents(tmp_path):
    with pytest.raises(FeatureStoreError, match="no manifest here"):
        read_mapping(tmp_path / "m.json", FeatureStoreError, "no manifest here")
    (tmp_path / "e.yaml").write_text("")
    (tmp_path / "g.json").write_text('{"a": [1, 2]}')
    (tmp_path / "bytes.json").write_bytes(b"\xff\xfe")
    assert read_mapping(tmp_path / "e.yaml", ModelLoadError) == {}
    assert read_mapping(tmp_path / "g.json", ModelLoadError) == {"a": [1, 2]}
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        read_mapping(tmp_path / "bytes.json", ModelLoadError)
