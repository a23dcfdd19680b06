"""Release vocabulary is defined once, in ``mirage.data.layout``, and shared by every module that names it."""

from __future__ import annotations

import pytest

from mirage.data import check, layout, synth
from mirage.errors import DataError


def test_silent_films_are_one_list():
    """The writer omits transcripts for exactly the films the checker does not expect one for."""
    assert layout.SILENT_MOVIES == ("chaplin",)
    assert check.SILENT_MOVIES is layout.SILENT_MOVIES
    assert synth.SILENT_MOVIES is layout.SILENT_MOVIES
    assert not hasattr(synth, "NO_TRANSCRIPT_MOVIES")


def test_target_sets_name_submissions_and_prediction_splits():
    from mirage import submission
    from mirage.distributed import predict

    assert not hasattr(submission, "SPLITS") and not hasattr(predict, "SPLITS")
    assert predict.PREDICT_SPLITS == (*layout.TARGET_SETS, "val")
    for split in layout.TARGET_SETS:
        assert submission._split(split) == split
    with pytest.raises(DataError, match=r"expected one of \['friends-s7', 'ood'\]"):
        submission._split("val")
