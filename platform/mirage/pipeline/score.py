"""Score a predictions file against the dataset's fMRI with the official rule (no Ray, no MLflow)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mirage.config import Config
from mirage.errors import DataError
from mirage.submission import fmri_targets, read_predictions, read_submission, score_predictions


@dataclass
class Scores:
    """Scores of a predictions file.

    Attributes:
        split: the scoring rule applied (``val``, ``friends-s7``, ``ood``).
        score: mean over subjects of the official-form Pearson r.
        subjects: subject -> its official-form r, sorted by subject.
        raw: what :func:`mirage.submission.score_predictions` returned.
    """

    split: str
    score: float
    subjects: dict[str, float]
    raw: dict[str, float]


def score_file(cfg: Config, path: str | Path, split: str | None = None) -> Scores:
    """Score a ``predictions_val.npz`` or a submission zip against ``data.root``'s fMRI.

    ``split``: the scoring rule (default: the zip's split, ``val`` for an npz).

    Raises:
        DataError: no file at ``path``, or fMRI missing for a predicted run.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: predictions file not found")
    if path.suffix == ".zip":
        found, preds = read_submission(path)
    else:
        found, preds = "val", read_predictions(path)
    split = split or found
    targets = fmri_targets(cfg.data.root, cfg.data, {s: list(v) for s, v in preds.items()})
    raw = score_predictions(preds, targets, split)
    return Scores(split=split, score=raw["score"], subjects={s: raw[s] for s in sorted(targets)}, raw=raw)
