"""Transcripts: one tsv row per TR chunk, words as Python-list strings.

Columns (release): ``text_per_tr`` (string), ``words_per_tr``, ``onsets_per_tr``,
``durations_per_tr`` (Python-list strings; onsets in seconds from movie start).
A word belongs to the chunk in which it ends. Rows without words hold ``[]``
(or are empty); extra columns are ignored.
"""

from __future__ import annotations

import ast
import csv
import math
from dataclasses import dataclass
from pathlib import Path

from mirage.errors import DataError

COLUMNS = ("text_per_tr", "words_per_tr", "onsets_per_tr", "durations_per_tr")
_LIST_COLUMNS = COLUMNS[1:]


@dataclass(frozen=True)
class Word:
    """One transcript word; onset and offset in seconds from movie start."""

    text: str
    onset: float
    offset: float


def _parse_list(cell: str | None, path: Path, line: int, column: str, kind: type) -> list:
    if cell is None or cell.strip() in ("", "nan", "NaN", "None"):
        return []
    try:
        value = ast.literal_eval(cell.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise DataError(
            f"{path}: line {line}, column {column!r}: {cell[:60]!r} is not a Python list literal"
        ) from None
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list):
        raise DataError(f"{path}: line {line}, column {column!r}: expected a list, got {type(value).__name__}")
    for v in value:
        ok = isinstance(v, str) if kind is str else (isinstance(v, (int, float)) and not isinstance(v, bool))
        if not ok or (kind is float and not math.isfinite(v)):
            raise DataError(
                f"{path}: line {line}, column {column!r}: element {v!r} is not a {'string' if kind is str else 'finite number'}"
            )
    return value


def read_rows(path: str | Path) -> list[list[Word]]:
    """The words of each TR chunk (row), in file order.

    Raises DataError naming the file, line and column for a missing file, missing columns,
    malformed list strings, lists of different lengths or negative times.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: transcript not found")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t")
            missing = [c for c in _LIST_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{path}: missing columns {missing}; expected {list(COLUMNS)}")
            rows = []
            for i, row in enumerate(reader):
                line = i + 2
                words = _parse_list(row.get("words_per_tr"), path, line, "words_per_tr", str)
                onsets = _parse_list(row.get("onsets_per_tr"), path, line, "onsets_per_tr", float)
                durs = _parse_list(row.get("durations_per_tr"), path, line, "durations_per_tr", float)
                if not (len(words) == len(onsets) == len(durs)):
                    raise DataError(
                        f"{path}: line {line}: {len(words)} words, {len(onsets)} onsets, {len(durs)} durations; "
                        "expected equal lengths"
                    )
                if any(o < 0 for o in onsets) or any(d < 0 for d in durs):
                    raise DataError(f"{path}: line {line}: negative onset or duration")
                rows.append([Word(w, float(o), float(o) + float(d)) for w, o, d in zip(words, onsets, durs)])
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    except csv.Error as e:
        raise DataError(f"{path}: not a readable tsv ({e})") from None
    return rows


def read_words(path: str | Path) -> list[Word]:
    """All words of a transcript, in file order. DataError on malformed input (see :func:`read_rows`)."""
    return [w for row in read_rows(path) for w in row]


def chunk_words(words: list[Word], tr: float, n_rows: int) -> list[list[Word]]:
    """Assign words to TR chunks by the chunk in which they end (the release rule)."""
    rows: list[list[Word]] = [[] for _ in range(n_rows)]
    for w in words:
        k = min(max(int(math.floor(w.offset / tr)), 0), n_rows - 1)
        rows[k].append(w)
    return rows


def write_transcript(path: str | Path, rows: list[list[Word]]) -> None:
    """Write rows in the release format (list strings in the Python repr)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(COLUMNS)
        for row in rows:
            w.writerow([
                " ".join(x.text for x in row),
                repr([x.text for x in row]),
                repr([round(float(x.onset), 3) for x in row]),
                repr([round(float(x.offset - x.onset), 3) for x in row]),
            ])
