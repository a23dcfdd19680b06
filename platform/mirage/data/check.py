"""``mirage data check``: validate a dataset directory in the Algonauts 2025 layout.

Everything is read from the files (the release's quirks are accepted: missing
runs, ``_run-N`` keys, any float dtype, any frame rate, sample rate or channel
count, no transcript for the silent film). Problems are collected, not raised:
each names the file (and key) and what was expected; ``report["ok"]`` is False
when there is at least one.

Media integrity: every movie is demuxed to its last packet (nothing decoded); a video or audio
stream ending more than ``features.media_tolerance_s`` before the container's duration (a
truncated or corrupt file) is an error naming the file and the seconds missing.

Length reconciliation (``mirage.data.fmri.reconcile_lengths``): the fMRI run is
the reference and keeps all its rows; the stimulus spans ceil(duration / TR)
TRs; a difference up to ``data.max_length_mismatch_trs`` is accepted and
reported under ``lengths``, a larger one is an error.

Atlas: where a subject has ``fmri/<sub>/atlas/<sub>_..._desc-dseg_parcellation.nii.gz``, it must be a
readable 3-D NIfTI whose labels are whole numbers, exactly 1..``data.n_parcels`` plus 0 background
(``mirage.brain.atlas.validate_atlas``). A subject without one gets a note (no brain maps).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import av
import h5py
import numpy as np

from mirage.config import DataConfig, FeaturesConfig
from mirage.data.fmri import reconcile_lengths, stimulus_trs
from mirage.data.layout import (
    _H5_NAME, SILENT_MOVIES, TARGET_SETS, Release, Stimulus, parse_fmri_key, source_of, stimulus_paths,
    unfetched_error,
)
from mirage.data.media import MediaReader
from mirage.data.splits import SPLITS, _selectors, matches
from mirage.data.transcripts import read_rows
from mirage.errors import DataError, MirageError


class _Report:
    def __init__(self, root: Path):
        self.d: dict = {
            "root": str(root), "ok": True, "errors": [], "warnings": [], "notes": [],
            "subjects": {}, "stimuli": {}, "lengths": {}, "splits": {},
        }

    def error(self, msg: str) -> None:
        self.d["errors"].append(msg)
        self.d["ok"] = False

    def warn(self, msg: str) -> None:
        self.d["warnings"].append(msg)


def _progress(enabled: bool):
    if not enabled:
        return nullcontext(None)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    console=Console(stderr=True), transient=True)


def check_dataset(
    root: str | Path, cfg: DataConfig, progress: bool = False,
    media_tolerance_s: float = FeaturesConfig.model_fields["media_tolerance_s"].default,
) -> dict:
    """Validate ``root``; returns the report (JSON-serialisable dict, ``ok`` False on problems).

    ``media_tolerance_s``: ``features.media_tolerance_s``, the largest gap tolerated between a
    stream's last packet and the container's duration.

    Keys: ``subjects`` ({subject: {"runs": {h5 key: [n_trs, n_parcels]}, "files": [...],
    "target_samples": {set: {chunk: n_trs}}}}), ``stimuli`` ({id: facts}), ``lengths``,
    ``splits``, ``errors``, ``warnings``, ``notes``.
    """
    root = Path(root).expanduser().resolve()
    rep = _Report(root)
    if not root.is_dir():
        rep.error(f"{root}: dataset root is not a directory")
        return rep.d
    for sub in ("fmri", "stimuli/movies"):
        if not (root / sub).is_dir():
            rep.error(f"{root / sub}: directory missing; expected the release layout (fmri/, stimuli/movies/)")
    if not rep.d["ok"]:
        return rep.d
    release = Release(root)
    unfetched = release.unfetched()
    if unfetched:  # git-annex files whose content is absent: nothing further can be read
        rep.error(str(unfetched_error(root, unfetched)))
        return rep.d
    with _progress(progress) as bar:
        durations = _check_stimuli(release, cfg, rep, bar, media_tolerance_s)
        _check_fmri(release, cfg, rep, bar)
    _check_atlases(release, cfg, rep)
    _check_lengths(release, cfg, rep, durations)
    _check_targets(release, cfg, rep, durations)
    _check_splits(release, cfg, rep)
    return rep.d


# ------------------------------------------------------------------ fMRI


def _check_fmri(release: Release, cfg: DataConfig, rep: _Report, bar) -> None:
    found = release.subjects()
    for sub in cfg.subjects:
        if sub not in found:
            rep.error(f"{release.root / 'fmri' / sub / 'func'}: no *_bold.h5 file; expected fMRI of {sub} (data.subjects)")
    for sub in found:
        if sub not in cfg.subjects:
            rep.warn(f"{release.root / 'fmri' / sub}: subject not in data.subjects {cfg.subjects}; ignored by training")
    files = [(sub, p) for sub in found for p in release.fmri_files(sub)]
    task = bar.add_task("fMRI files", total=len(files)) if bar else None
    for sub in found:
        entry = rep.d["subjects"].setdefault(sub, {"runs": {}, "files": [], "dtypes": [], "target_samples": {}})
    for sub, path in files:
        entry = rep.d["subjects"][sub]
        entry["files"].append(path.name)
        if not _H5_NAME.match(path.name):
            rep.warn(f"{path}: file name not of the form <sub>_task-<friends|movie10>_..._bold.h5")
        _check_h5(path, cfg, rep, entry)
        if bar:
            bar.advance(task)
    for entry in rep.d["subjects"].values():
        entry["dtypes"] = sorted(set(entry["dtypes"]))


def _check_h5(path: Path, cfg: DataConfig, rep: _Report, entry: dict) -> None:
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        rep.error(f"{path}: not a readable HDF5 file ({e}); expected one 2-D dataset per run")
        return
    try:
        with f:
            _check_h5_keys(f, path, cfg, rep, entry)
    except (OSError, RuntimeError, KeyError) as e:
        rep.error(f"{path}: cannot be read, the file is truncated or corrupt ({e})")


def _check_h5_keys(f: h5py.File, path: Path, cfg: DataConfig, rep: _Report, entry: dict) -> None:
    for key in sorted(f.keys()):
        where = f"{path}: key {key!r}"
        try:
            parse_fmri_key(key)
        except DataError:
            rep.error(f"{where}: expected a key 'ses-<NNN>_task-<stimulus>[_run-<N>]'")
            continue
        ds = f[key]
        if not isinstance(ds, h5py.Dataset) or ds.ndim != 2:
            shape = getattr(ds, "shape", "a group")
            rep.error(f"{where}: shape {shape}, expected a 2-D dataset (n_trs, {cfg.n_parcels})")
            continue
        if ds.dtype.kind != "f":
            rep.error(f"{where}: dtype {ds.dtype}, expected floating point")
            continue
        n, p = (int(x) for x in ds.shape)
        entry["runs"][key] = [n, p]
        entry["dtypes"].append(str(ds.dtype))
        if p != cfg.n_parcels:
            rep.error(f"{where}: {p} parcels (shape {ds.shape}), expected {cfg.n_parcels} (data.n_parcels)")
        if n == 0:
            rep.error(f"{where}: 0 TRs, expected a non-empty run")
            continue
        try:
            data = ds[()]
        except OSError as e:
            rep.error(f"{where}: cannot be read, the file is truncated or corrupt ({e})")
            continue
        bad = ~np.isfinite(data)
        if bad.any():
            r, c = np.nonzero(bad)
            rep.error(f"{where}: {int(bad.sum())} NaN/inf values (first at TR {r[0]}, parcel {c[0]}); expected finite values")


def _check_atlases(release: Release, cfg: DataConfig, rep: _Report) -> None:
    from mirage.brain.atlas import atlas_path, validate_atlas

    fmri = release.root / "fmri"
    subjects = sorted(p.name for p in fmri.iterdir() if p.is_dir() and p.name.startswith("sub-"))
    lacking = []
    for sub in subjects:
        path = atlas_path(release.root, sub)
        if not (path.exists() or path.is_symlink()):
            lacking.append(sub)
            continue
        entry = rep.d["subjects"].setdefault(sub, {"runs": {}, "files": [], "dtypes": [], "target_samples": {}})
        try:
            img = validate_atlas(path, cfg.n_parcels)
        except DataError as e:
            rep.error(str(e))
            continue
        entry["atlas"] = {"file": path.name, "shape": [int(x) for x in img.shape[:3]],
                          "voxel_mm": [round(float(x), 3) for x in img.header.get_zooms()[:3]]}
    if lacking:
        rep.d["notes"].append(f"no atlas (fmri/<sub>/atlas/) for {', '.join(lacking)}: brain maps need one")


# --------------------------------------------------------------- stimuli


def _check_stimuli(release: Release, cfg: DataConfig, rep: _Report, bar, media_tolerance_s: float) -> dict[str, float]:
    stimuli = release.stimuli()
    known = {st.video for st in stimuli.values()}
    for p in sorted((release.root / "stimuli" / "movies").rglob("*.mkv")):
        if p not in known:
            rep.warn(f"{p}: not named as in the release layout; ignored")
    durations: dict[str, float] = {}
    task = bar.add_task("stimuli", total=len(stimuli)) if bar else None
    for sid, st in stimuli.items():
        facts = _check_media(st, rep, media_tolerance_s)
        if facts.get("duration") is not None:
            durations[sid] = facts["duration"]
        facts.update(_check_transcript(release.root, st, cfg, rep, facts.get("duration")))
        rep.d["stimuli"][sid] = facts
        if bar:
            bar.advance(task)
    return durations


def _check_media(st: Stimulus, rep: _Report, tolerance_s: float) -> dict:
    facts: dict = {"source": st.source, "group": st.group, "video": str(st.video), "duration": None}
    try:
        with MediaReader(st.video) as m:
            if not m.has_video:
                rep.error(f"{st.video}: no video stream, expected one")
            if not m.has_audio:
                rep.error(f"{st.video}: no audio track, expected an audio stream")
            if not (m.has_video and m.has_audio):
                return facts
            duration = float(m.duration)
            if not duration > 0:
                rep.error(f"{st.video}: duration {duration} s, expected > 0")
                return facts
            v, a = m.video_info, m.audio_info
            facts.update(duration=m.length_s, fps=round(v.fps, 3), size=[v.width, v.height],
                         video_codec=v.codec, sample_rate=a.sample_rate, channels=a.channels, audio_codec=a.codec)
            try:
                ends = m.check_complete(tolerance_s)
            except DataError as e:
                rep.error(f"{e} (features.media_tolerance_s)")
                return facts
            facts.update(stream_ends={k: round(e, 3) for k, e in ends.ends.items()})
            m.frames_at([0.0, duration / 2])
            m.audio(0.0, min(1.0, duration))
    except MirageError as e:
        rep.error(f"{e}; expected a movie with a decodable video and audio stream")
    except (av.error.FFmpegError, OSError, ValueError) as e:
        rep.error(f"{st.video}: does not decode ({e}); expected a movie with a decodable video and audio stream")
    return facts


def _check_transcript(root: Path, st: Stimulus, cfg: DataConfig, rep: _Report, duration: float | None) -> dict:
    if st.transcript is None:
        _, tsv = stimulus_paths(st.id, st.source)
        msg = f"{root / tsv}: no transcript for {st.id}; its text input is empty"
        if st.source == "ood" and st.group in SILENT_MOVIES:
            rep.d["notes"].append(msg + " (silent film, as released)")
        else:
            rep.warn(msg)
        return {"transcript": None}
    try:
        rows = read_rows(st.transcript)
    except MirageError as e:
        rep.error(f"{e}")
        return {"transcript": str(st.transcript)}
    facts = {"transcript": str(st.transcript), "transcript_rows": len(rows), "words": sum(len(r) for r in rows)}
    if duration is not None:
        n_stim = stimulus_trs(duration, cfg.tr)
        if abs(len(rows) - n_stim) > cfg.max_length_mismatch_trs:
            rep.warn(f"{st.transcript}: {len(rows)} rows but the movie spans {n_stim} TRs "
                     f"(more than data.max_length_mismatch_trs = {cfg.max_length_mismatch_trs} apart)")
        late = [w for r in rows for w in r if w.onset > duration + cfg.tr]
        if late:
            rep.warn(f"{st.transcript}: {len(late)} words start after the movie ends ({duration:.1f} s)")
    return facts


# --------------------------------------------------------------- lengths


def _check_lengths(release: Release, cfg: DataConfig, rep: _Report, durations: dict[str, float]) -> None:
    stimuli = release.stimuli()
    diffs: list[int] = []
    for sub, entry in rep.d["subjects"].items():
        for path_name in entry["files"]:
            path = release.root / "fmri" / sub / "func" / path_name
            m = _H5_NAME.match(path_name)
            source = m.group("task") if m else None
            for key in _keys_of(path, entry):
                sid, _ = parse_fmri_key(key)
                if sid not in stimuli:
                    try:
                        expected = release.expected_video(sid, source if source in ("friends", "movie10") else None)
                    except DataError:
                        expected = f"a video for {sid!r} under {release.root / 'stimuli' / 'movies'}"
                    rep.error(f"{path}: key {key!r}: stimulus file missing; expected {expected}")
                    continue
                if sid not in durations:
                    continue
                n = entry["runs"][key][0]
                try:
                    r = reconcile_lengths(n, durations[sid], cfg.tr, cfg.max_length_mismatch_trs, where=f"{path}: key {key!r}")
                except DataError as e:
                    rep.error(str(e))
                    continue
                diffs.append(r.diff_trs)
    counts = Counter(diffs)
    rep.d["lengths"] = {
        "rule": "fMRI rows are kept; stimulus TRs = ceil(duration / tr); |fMRI - stimulus| <= "
                f"{cfg.max_length_mismatch_trs} TRs (data.max_length_mismatch_trs)",
        "runs_checked": len(diffs),
        "runs_differing": sum(v for k, v in counts.items() if k != 0),
        "max_abs_diff_trs": max((abs(d) for d in diffs), default=0),
        "diff_histogram": {str(k): v for k, v in sorted(counts.items())},
    }


def _keys_of(path: Path, entry: dict) -> list[str]:
    """Keys of ``path`` that passed the h5 checks (recorded in ``entry['runs']``)."""
    try:
        with h5py.File(path, "r") as f:
            keys = list(f.keys())
    except OSError:
        return []
    return [k for k in keys if k in entry["runs"]]


# --------------------------------------------------------- test targets


def _check_targets(release: Release, cfg: DataConfig, rep: _Report, durations: dict[str, float]) -> None:
    stimuli = release.stimuli()
    for sub in sorted(set(rep.d["subjects"]) | set(cfg.subjects)):
        entry = rep.d["subjects"].setdefault(sub, {"runs": {}, "files": [], "dtypes": [], "target_samples": {}})
        for name in TARGET_SETS:
            try:
                chunks = release.target_samples(sub, name)
            except DataError as e:
                if "not found" in str(e):
                    rep.warn(f"{e}; no {name} predictions possible for {sub}")
                else:
                    rep.error(f"{e}; expected a pickled dict chunk key -> n_TRs")
                continue
            entry["target_samples"][name] = chunks
            for chunk, n in chunks.items():
                if chunk not in stimuli:
                    try:
                        expected = str(release.expected_video(chunk, source_of(chunk)))
                    except DataError:
                        expected = f"a stimulus named {chunk!r}"
                    rep.warn(f"{release.root / 'fmri' / sub / 'target_sample_number'}: {name} chunk {chunk!r} "
                             f"has no stimulus; expected {expected}")
                elif chunk in durations:
                    n_stim = stimulus_trs(durations[chunk], cfg.tr)
                    if abs(n - n_stim) > cfg.max_length_mismatch_trs:
                        rep.warn(f"{name} {sub}/{chunk}: {n} target TRs but the stimulus spans {n_stim} TRs")


# ---------------------------------------------------------------- splits


def _check_splits(release: Release, cfg: DataConfig, rep: _Report) -> None:
    stimuli = release.stimuli()
    for name in SPLITS:
        try:
            sel = _selectors(cfg, name)
        except MirageError as e:
            rep.error(str(e))
            continue
        ids = sorted(s for s, st in stimuli.items() if matches(sel, st.source, st.group, s))
        runs = {}
        for sub, entry in rep.d["subjects"].items():
            keys = [k for k in entry["runs"] if parse_fmri_key(k)[0] in ids]
            if keys:
                runs[sub] = len(keys)
        rep.d["splits"][name] = {"selectors": list(getattr(cfg, name)), "stimuli": len(ids), "runs": runs}
        if name != "test" and not runs:
            rep.warn(f"split {name!r} ({getattr(cfg, name)}): no fMRI runs selected (data.{name})")
        if name == "test" and not ids:
            rep.warn(f"split 'test' ({cfg.test}): no stimuli selected (data.test)")


# ---------------------------------------------------------------- output


def print_report(report: dict, as_json: bool = False) -> None:
    """Print the report: one JSON object on stdout, or a readable summary."""
    if as_json:
        print(json.dumps(report))
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    con = Console()
    status = "[green]OK[/green]" if report["ok"] else f"[red]{len(report['errors'])} problem(s)[/red]"
    con.print(f"[bold]Dataset[/bold] {report['root']}: {status}")
    if report["subjects"]:
        t = Table(title="fMRI")
        for col in ("subject", "runs", "TRs", "parcels", "dtypes", "friends-s7 chunks", "ood chunks"):
            t.add_column(col)
        for sub, e in report["subjects"].items():
            runs = e["runs"].values()
            t.add_row(sub, str(len(e["runs"])), str(sum(r[0] for r in runs)),
                      ",".join(sorted({str(r[1]) for r in runs})), ",".join(e.get("dtypes", [])),
                      str(len(e["target_samples"].get("friends-s7", {}))), str(len(e["target_samples"].get("ood", {}))))
        con.print(t)
    if report["stimuli"]:
        t = Table(title="stimuli")
        for col in ("source", "files", "hours", "with transcript", "fps", "audio"):
            t.add_column(col)
        by: dict[str, list[dict]] = {}
        for s in report["stimuli"].values():
            by.setdefault(s["source"], []).append(s)
        for src, items in by.items():
            hours = sum(s["duration"] or 0 for s in items) / 3600
            fps = sorted({s["fps"] for s in items if "fps" in s})
            audio = sorted({f"{s['sample_rate']} Hz x{s['channels']}" for s in items if "sample_rate" in s})
            t.add_row(src, str(len(items)), f"{hours:.2f}", str(sum(s["transcript"] is not None for s in items)),
                      ", ".join(map(str, fps)), ", ".join(audio))
        con.print(t)
    ln = report.get("lengths") or {}
    if ln:
        con.print(f"lengths: {ln['runs_checked']} runs checked, {ln['runs_differing']} differ from their stimulus "
                  f"(at most {ln['max_abs_diff_trs']} TRs); rule: {ln['rule']}", markup=False)
    for name, s in report.get("splits", {}).items():
        con.print(f"split {name}: {s['stimuli']} stimuli, runs per subject {s['runs']}", markup=False)
    for n in report.get("notes", []):
        con.print(f"note: {n}", markup=False, highlight=False)
    for w in report["warnings"]:
        con.print(Text("warning: ", style="yellow") + Text(w))
    for e in report["errors"]:
        print(f"error: {e}", file=sys.stderr)
