"""The Algonauts 2025 release layout: file names, h5 keys, stimulus ids.

Everything is enumerated from the files themselves (no list of episodes is
assumed), so a release with missing runs, extra runs or other subjects reads
the same way. The naming functions are shared with the synthetic writer, which
writes this very layout.

Layout under the dataset root::

    fmri/sub-01/func/sub-01_task-friends_space-..._desc-s123456_bold.h5   keys ses-003_task-s01e01a
    fmri/sub-01/func/sub-01_task-movie10_space-..._bold.h5               keys ses-001_task-life01_run-1
    fmri/sub-01/target_sample_number/sub-01_{friends-s7,ood}_fmri_samples.npy
    fmri/sub-01/atlas/sub-01_space-..._desc-dseg_parcellation.nii.gz      Schaefer labels 1..1000 (MNI)
    stimuli/movies/friends/s1/friends_s01e01a.mkv
    stimuli/movies/movie10/life/life01.mkv
    stimuli/movies/ood/chaplin/task-chaplin1_video.mkv
    stimuli/transcripts/friends/s1/friends_s01e01a.tsv
    stimuli/transcripts/movie10/life/movie10_life01.tsv
    stimuli/transcripts/ood/pulpfiction/ood_pulpfiction1.tsv

A release fetched with DataLad (git-annex) keeps every file whose content was not fetched as a
symlink to a missing object. Such a movie, transcript, fMRI, target or atlas file is never skipped:
reading it raises a DataError naming the files and the command that fetches them.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import h5py
import numpy as np

from mirage.errors import DataError

SOURCES = ("friends", "movie10", "ood")
TARGET_SETS = ("friends-s7", "ood")
SILENT_MOVIES = ("chaplin",)
"""OOD movies released without a transcript (silent films): no transcript file is expected or written."""

ATLAS_PART = "space-MNI152NLin2009cAsym_atlas-Schaefer18_parcel-1000Par7Net"

_FRIENDS_ID = re.compile(r"^s(\d{2})e(\d{2})([a-z])$")
_MOVIE10_ID = re.compile(r"^([a-z]+)(\d{2})$")
_OOD_ID = re.compile(r"^([a-z]+)(\d)$")
_KEY = re.compile(r"^(?:ses-(?P<ses>\d+)_)?task-(?P<task>[A-Za-z0-9]+)(?:_run-(?P<run>\d+))?$")
_H5_NAME = re.compile(r"^(?P<sub>sub-[A-Za-z0-9]+)_task-(?P<task>[A-Za-z0-9]+)_.*bold\.h5$")
_SHOWN = 5  # broken symlinks named in an error; the rest are counted


@dataclass(frozen=True)
class Stimulus:
    """One stimulus run (a movie file and its transcript)."""

    id: str
    source: str
    group: str
    video: Path
    transcript: Path | None


@dataclass(frozen=True)
class FmriRun:
    """One fMRI run: an h5 dataset key and the stimulus it was recorded on."""

    subject: str
    key: str
    stimulus_id: str
    path: Path
    source: str = ""


# ------------------------------------------------------------------ names


def fmri_file_name(subject: str, source: str) -> str:
    """Release file name of a subject's fMRI for ``source`` ('friends' or 'movie10')."""
    desc = "_desc-s123456" if source == "friends" else ""
    return f"{subject}_task-{source}_{ATLAS_PART}{desc}_bold.h5"


def fmri_key(session: int, stimulus_id: str, run: int | None = None) -> str:
    """h5 key of a run: ``ses-003_task-s01e01a``, ``ses-001_task-life01_run-2``."""
    return f"ses-{session:03d}_task-{stimulus_id}" + (f"_run-{run}" if run is not None else "")


def parse_fmri_key(key: str) -> tuple[str, int | None]:
    """``ses-001_task-life01_run-2`` -> (``life01``, 2). Raises DataError if the key is not of that form."""
    m = _KEY.match(key)
    if not m:
        raise DataError(f"h5 key {key!r}: expected 'ses-<NNN>_task-<stimulus>[_run-<N>]'")
    run = m.group("run")
    return m.group("task"), (int(run) if run is not None else None)


def source_of(stimulus_id: str) -> str:
    """'friends' for ``s01e01a``, 'movie10' for ``life01``, 'ood' for ``chaplin1``."""
    if _FRIENDS_ID.match(stimulus_id):
        return "friends"
    if _MOVIE10_ID.match(stimulus_id):
        return "movie10"
    if _OOD_ID.match(stimulus_id):
        return "ood"
    raise DataError(f"stimulus id {stimulus_id!r}: expected s<SS>e<EE><x>, <movie><NN> or <movie><N>")


def group_of(stimulus_id: str) -> str:
    """Season (``s1``) for Friends, the movie name (``life``, ``chaplin``) otherwise."""
    m = _FRIENDS_ID.match(stimulus_id)
    if m:
        return f"s{int(m.group(1))}"
    m = _MOVIE10_ID.match(stimulus_id) or _OOD_ID.match(stimulus_id)
    if m:
        return m.group(1)
    raise DataError(f"stimulus id {stimulus_id!r}: expected s<SS>e<EE><x>, <movie><NN> or <movie><N>")


def stimulus_paths(stimulus_id: str, source: str | None = None) -> tuple[Path, Path]:
    """Relative (video, transcript) paths of a stimulus in the release layout."""
    source = source or source_of(stimulus_id)
    group = group_of(stimulus_id)
    if source == "friends":
        return (
            Path("stimuli/movies/friends", group, f"friends_{stimulus_id}.mkv"),
            Path("stimuli/transcripts/friends", group, f"friends_{stimulus_id}.tsv"),
        )
    if source == "movie10":
        return (
            Path("stimuli/movies/movie10", group, f"{stimulus_id}.mkv"),
            Path("stimuli/transcripts/movie10", group, f"movie10_{stimulus_id}.tsv"),
        )
    if source == "ood":
        return (
            Path("stimuli/movies/ood", group, f"task-{stimulus_id}_video.mkv"),
            Path("stimuli/transcripts/ood", group, f"ood_{stimulus_id}.tsv"),
        )
    raise DataError(f"stimulus {stimulus_id!r}: unknown source {source!r}, expected one of {SOURCES}")


def target_samples_path(subject: str, name: str) -> Path:
    """Relative path of a target-sample-number file (``name`` in 'friends-s7', 'ood')."""
    return Path("fmri", subject, "target_sample_number", f"{subject}_{name}_fmri_samples.npy")


def _video_id(path: Path, source: str) -> str | None:
    stem = path.stem
    if source == "friends" and stem.startswith("friends_"):
        sid = stem[len("friends_"):]
        return sid if _FRIENDS_ID.match(sid) else None
    if source == "movie10":
        return stem if _MOVIE10_ID.match(stem) else None
    if source == "ood" and stem.startswith("task-") and stem.endswith("_video"):
        sid = stem[len("task-"): -len("_video")]
        return sid if _OOD_ID.match(sid) else None
    return None


def broken_links(paths) -> list[Path]:
    """The paths that are symlinks to a missing target (git-annex files whose content is absent)."""
    return [p for p in paths if p.is_symlink() and not p.exists()]


def unfetched_error(root: Path, broken: list[Path]) -> DataError:
    """A DataError naming (the first few of) ``broken`` and the command that fetches them."""
    rel = sorted(str(p.relative_to(root)) if p.is_relative_to(root) else str(p) for p in broken)
    shown = ", ".join(rel[:_SHOWN]) + (f" and {len(rel) - _SHOWN} more" if len(rel) > _SHOWN else "")
    targets = rel if len(rel) <= _SHOWN else sorted({str(Path(r).parent) for r in rel})
    get = " ".join(targets[:_SHOWN]) + (" ..." if len(targets) > _SHOWN else "")
    return DataError(
        f"{root}: {len(rel)} dataset file(s) are broken symlinks, their content not fetched: {shown}; "
        f"expected the files themselves. Fetch them with `cd {root} && datalad get {get}` "
        f"(or `git annex get {get}`)"
    )


# --------------------------------------------------------- pickled dicts


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays/scalars, nothing that can run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "array"), ("numpy", "dtype"), ("builtins", "bytearray"), ("numpy.dtypes", "Int64DType"),
        ("numpy.dtypes", "Int32DType"), ("numpy.dtypes", "ObjectDType"), ("numpy.dtypes", "Float32DType"),
        ("numpy.dtypes", "Float64DType"), ("numpy.dtypes", "Float16DType"), ("builtins", "dict"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str):  # noqa: D102
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def load_pickled_dict(path: Path) -> dict:
    """A dict saved with ``np.save(path, dict)`` (0-d object array), loaded without arbitrary code.

    Raises DataError naming the file if it is not such a file.
    """
    try:
        with open(path, "rb") as f:
            return read_pickled_dict(f, str(path))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None


def read_pickled_dict(f: BinaryIO, where: str) -> dict:
    """Read a ``.npy`` 0-d object array holding a dict from the open binary file ``f``.

    Only plain containers and numpy arrays/scalars are unpickled (an allow-list), so a crafted
    file cannot run code. ``where`` names the file in errors.

    Raises:
        DataError: not an object ``.npy``, a refused or broken pickle, or not a dict.
    """
    try:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
        if not dtype.hasobject:
            raise DataError(f"{where}: expected a pickled dict (object array), got dtype {dtype}")
        obj = _NumpyOnlyUnpickler(f).load()
    except DataError:
        raise
    except Exception as e:  # numpy header or pickle errors
        raise DataError(f"{where}: not a readable .npy pickled dict ({e})") from None
    if isinstance(obj, np.ndarray) and obj.shape == () and obj.dtype == object:
        obj = obj.item()
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a dict, got {type(obj).__name__} (shape {shape})")
    return obj


# ----------------------------------------------------------------- release


class Release:
    """Reader of a dataset directory in the Algonauts 2025 release layout."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise DataError(f"dataset root {self.root} is not a directory")
        self._runs: dict[str, list[FmriRun]] = {}
        self._stimuli: dict[str, Stimulus] | None = None

    def __repr__(self) -> str:
        return f"Release({str(self.root)!r})"

    # --- subjects and fMRI

    def subjects(self) -> list[str]:
        """Subjects that have at least one fMRI h5 file, sorted."""
        fmri = self.root / "fmri"
        if not fmri.is_dir():
            return []
        return sorted(p.name for p in fmri.iterdir() if p.is_dir() and p.name.startswith("sub-") and self.fmri_files(p.name))

    def fmri_files(self, subject: str) -> list[Path]:
        """The subject's ``*_bold.h5`` files, sorted. Raises DataError if one is a broken symlink."""
        func = self.root / "fmri" / subject / "func"
        if not func.is_dir():
            return []
        found = sorted(func.glob("*_bold.h5"))
        broken = broken_links(found)
        if broken:
            raise unfetched_error(self.root, broken)
        return [p for p in found if p.is_file()]

    def fmri_runs(self, subject: str) -> list[FmriRun]:
        """Every run of a subject (all h5 files), in file then key order.

        Raises DataError naming the file if an h5 file cannot be opened or a key is malformed.
        """
        if subject not in self._runs:
            self._runs[subject] = self._read_runs(subject)
        return list(self._runs[subject])

    def _read_runs(self, subject: str) -> list[FmriRun]:
        runs: list[FmriRun] = []
        for path in self.fmri_files(subject):
            m = _H5_NAME.match(path.name)
            source = m.group("task") if m else ""
            try:
                with h5py.File(path, "r") as f:
                    keys = sorted(f.keys())
            except (OSError, RuntimeError, KeyError) as e:
                raise DataError(f"{path}: not a readable HDF5 file ({e})") from None
            for key in keys:
                try:
                    sid, _ = parse_fmri_key(key)
                except DataError as e:
                    raise DataError(f"{path}: {e}") from None
                runs.append(FmriRun(subject=subject, key=key, stimulus_id=sid, path=path, source=source))
        return runs

    def target_samples(self, subject: str, name: str) -> dict[str, int]:
        """Chunk key -> number of TRs to predict, from ``target_sample_number`` ('friends-s7' or 'ood')."""
        if name not in TARGET_SETS:
            raise DataError(f"target set {name!r}: expected one of {TARGET_SETS}")
        path = self.root / target_samples_path(subject, name)
        if broken_links([path]):
            raise unfetched_error(self.root, [path])
        if not path.is_file():
            raise DataError(f"{path}: target sample number file not found")
        raw = load_pickled_dict(path)
        out: dict[str, int] = {}
        for k, v in raw.items():
            try:
                n = int(v)
            except (TypeError, ValueError):
                raise DataError(f"{path}: chunk {k!r} has {v!r}, expected a number of TRs") from None
            if n <= 0 or n != v:
                raise DataError(f"{path}: chunk {k!r} has {v!r}, expected a positive whole number of TRs")
            out[str(k)] = n
        return out

    # --- stimuli

    def stimuli(self) -> dict[str, Stimulus]:
        """Stimulus id -> Stimulus for every video file found under ``stimuli/movies``.

        Raises DataError naming the movies and transcripts that are broken symlinks (not fetched).
        """
        if self._stimuli is None:
            self._stimuli = self._find_stimuli()
        return dict(self._stimuli)

    def _find_stimuli(self) -> dict[str, Stimulus]:
        found: dict[str, Stimulus] = {}
        broken: list[Path] = []
        movies = self.root / "stimuli" / "movies"
        for source in SOURCES:
            base = movies / source
            if not base.is_dir():
                continue
            for path in sorted(base.glob("*/*.mkv")):
                sid = _video_id(path, source)
                if sid is None:
                    continue
                _, tsv = stimulus_paths(sid, source)
                transcript = self.root / tsv
                broken += broken_links([path, transcript])
                found[sid] = Stimulus(
                    id=sid, source=source, group=group_of(sid), video=path,
                    transcript=transcript if transcript.is_file() else None,
                )
        if broken:
            raise unfetched_error(self.root, broken)
        return found

    def unfetched(self) -> list[Path]:
        """Every movie, transcript, fMRI, target and atlas file of the layout that is a broken symlink."""
        patterns = ("stimuli/movies/*/*/*.mkv", "stimuli/transcripts/*/*/*.tsv", "fmri/sub-*/func/*_bold.h5",
                    "fmri/sub-*/target_sample_number/*.npy", "fmri/sub-*/atlas/*.nii.gz")
        return sorted(p for pat in patterns for p in broken_links(self.root.glob(pat)))

    def stimulus(self, stimulus_id: str, source: str | None = None) -> Stimulus:
        """The stimulus with this id; DataError naming the expected video path if it is missing."""
        st = self.stimuli().get(stimulus_id)
        if st is None:
            video, _ = stimulus_paths(stimulus_id, source)
            raise DataError(f"stimulus {stimulus_id!r}: video file {self.root / video} not found")
        return st

    def expected_video(self, stimulus_id: str, source: str | None = None) -> Path:
        """Absolute path where the release keeps the video of ``stimulus_id``."""
        return self.root / stimulus_paths(stimulus_id, source)[0]
