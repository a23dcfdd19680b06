"""A synthetic dataset in the Algonauts 2025 release layout, with a planted signal.

Every stimulus carries three slowly varying properties, piecewise constant over
segments of ``segment_min_s`` to ``segment_max_s`` seconds, drawn independently:

- vision: frame brightness (a fixed texture scaled by a level in [0.1, 0.9]);
- audio: loudness (level in [0, 1], amplitude 0.02 * 10 ** (1.4 * level) of a two-tone sound);
- text: word rate (words per second, 0 to 3; words go into the transcript).

Planted parcels are ``planted_fraction`` of all parcels, or of one Yeo-7 network's parcels when
``planted_network`` is set (networks as in ``mirage.brain.networks``). Each planted parcel is
driven by one modality: its clean signal is the property,
convolved with the canonical HRF and sampled at the middle of each TR, times a
subject-specific weight (random sign, magnitude 0.5-1.5). Gaussian noise is added
at a per-parcel SNR (signal variance / noise variance, log-uniform within a factor
2 of ``snr``), and each subject's parcels get an offset and a scale, as raw BOLD
would. The other parcels are noise. The noise ceiling of a parcel, the largest
correlation a prediction can reach with its fMRI, is sqrt(snr / (1 + snr)).

Every subject gets the release's atlas file, ``fmri/<sub>/atlas/<sub>_..._desc-dseg_parcellation.nii.gz``:
a small synthetic Schaefer-like parcellation (``mirage.brain.atlas.synthetic_atlas``, labels
1..parcels on an ``atlas_voxel_mm`` MNI grid, Yeo-7 networks in posterior-to-anterior bands).

The ground truth is written to ``<out>/_truth/`` (outside the release layout):
``truth.json`` (per-parcel modality, network, SNR and noise ceiling, the planted network, runs,
stimuli, missing runs) and ``truth.npz`` (the same per-parcel arrays, subject weights,
the per-TR stimulus properties ``property/<stimulus>`` (n_trs, 3), and per run
``bold/<subject>/<key>`` (exactly what the h5 holds) and ``signal/<subject>/<key>``
(its noise-free part), each (n_trs, n_parcels) float32).

The whole directory appears atomically: it is written to a temporary sibling
and renamed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from mirage.brain.atlas import atlas_path, synthetic_atlas
from mirage.brain.networks import parcel_networks
from mirage.config import MODALITIES, SUBJECTS, SynthConfig
from mirage.data.fmri import stimulus_trs
from mirage.data.hrf import convolve_hrf
from mirage.data.layout import SILENT_MOVIES, fmri_file_name, fmri_key, stimulus_paths, target_samples_path
from mirage.data.synth_media import write_mkv
from mirage.data.transcripts import Word, chunk_words, write_transcript
from mirage.errors import DataError

TEST_SEASON = 7  # Friends season whose fMRI is withheld (target sample numbers only)
RUN_SUFFIX_MOVIES = ("life", "figures")  # Movie10 movies seen twice (_run-1, _run-2)
VOCABULARY = (
    "hey", "you", "know", "what", "coffee", "okay", "really", "yeah", "look", "come", "on", "well",
    "the", "apartment", "tonight", "great", "sorry", "think", "just", "something", "believe", "wait",
    "right", "friends", "dinosaur", "couch", "date", "ross", "rachel", "monica", "joey", "chandler",
)
_DT = 0.1  # seconds; resolution of the property timelines before HRF convolution


@dataclass
class _Stim:
    id: str
    source: str
    fmri: bool  # has fMRI (train/val) or only target sample numbers (test)


@dataclass
class _Props:
    edges: np.ndarray  # (n_seg + 1,) seconds, per modality
    values: np.ndarray  # (n_seg,)

    def at(self, t: np.ndarray) -> np.ndarray:
        idx = np.clip(np.searchsorted(self.edges, t, side="right") - 1, 0, len(self.values) - 1)
        return self.values[idx]


def _rng(seed: int, *names: str | int) -> np.random.Generator:
    return np.random.default_rng([seed, *(zlib.crc32(str(n).encode()) for n in names)])


def _plan(cfg: SynthConfig) -> list[_Stim]:
    stims: list[_Stim] = []
    for s in cfg.seasons:
        for e in range(1, cfg.episodes + 1):
            for part in "ab":
                stims.append(_Stim(f"s{s:02d}e{e:02d}{part}", "friends", fmri=s != TEST_SEASON))
    for movie in cfg.movies:
        for k in range(1, cfg.episodes + 1):
            stims.append(_Stim(f"{movie}{k:02d}", "movie10", fmri=True))
    for movie in cfg.ood_movies:
        for k in (1, 2):
            stims.append(_Stim(f"{movie}{k}", "ood", fmri=False))
    return stims


def _segments(rng: np.random.Generator, cfg: SynthConfig, values) -> _Props:
    edges = [0.0]
    while edges[-1] < cfg.seconds:
        edges.append(edges[-1] + rng.uniform(cfg.segment_min_s, max(cfg.segment_min_s, cfg.segment_max_s)))
    n = len(edges) - 1
    vals = rng.choice(values, size=n) if not callable(values) else values(n)
    return _Props(np.asarray(edges), np.asarray(vals, dtype=np.float64))


def _properties(cfg: SynthConfig, stim: _Stim) -> dict[str, _Props]:
    rng = _rng(cfg.seed, "props", stim.id)
    silent = any(stim.id.startswith(m) for m in SILENT_MOVIES) and stim.source == "ood"
    return {
        "vision": _segments(rng, cfg, lambda n: rng.uniform(0.1, 0.9, n)),
        "audio": _segments(rng, cfg, lambda n: rng.uniform(0.0, 1.0, n)),
        "text": _segments(rng, cfg, [0.0] if silent else [0.0, 0.75, 1.5, 2.25, 3.0]),
    }


def _frames(cfg: SynthConfig, stim: _Stim, props: _Props) -> np.ndarray:
    rng = _rng(cfg.seed, "texture", stim.id)
    n = int(round(cfg.seconds * cfg.fps))
    small = rng.uniform(0.6, 1.0, (cfg.height // 8 + 1, cfg.width // 8 + 1, 3))
    texture = np.kron(small, np.ones((8, 8, 1)))[: cfg.height, : cfg.width]  # (H, W, 3)
    level = props.at(np.arange(n) / cfg.fps)  # (n,)
    return np.clip(255 * level[:, None, None, None] * texture[None], 0, 255).astype(np.uint8)  # (n, H, W, 3)


def _audio(cfg: SynthConfig, stim: _Stim, props: _Props) -> np.ndarray:
    rng = _rng(cfg.seed, "audio", stim.id)
    t = np.arange(int(round(cfg.seconds * cfg.sample_rate))) / cfg.sample_rate
    amp = 0.02 * 10 ** (1.4 * props.at(t))
    tone = 0.6 * np.sin(2 * np.pi * 220 * t) + 0.3 * np.sin(2 * np.pi * 330 * t) + 0.05 * rng.standard_normal(len(t))
    mono = (amp * tone).astype(np.float32)
    return np.stack([mono] * cfg.channels)  # (C, n)


def _words(cfg: SynthConfig, stim: _Stim, props: _Props) -> list[Word]:
    rng = _rng(cfg.seed, "words", stim.id)
    words: list[Word] = []
    for a, b, rate in zip(props.edges[:-1], props.edges[1:], props.values):
        b = min(b, cfg.seconds)
        n = int(round(rate * (b - a)))
        for k in range(n):
            onset = a + (k + rng.uniform(0.1, 0.5)) * (b - a) / n
            words.append(Word(str(rng.choice(VOCABULARY)), float(onset), float(min(onset + 0.25, cfg.seconds))))
    return words


def _tr_properties(props: dict[str, _Props], seconds: float, tr: float, n_trs: int) -> np.ndarray:
    """Mean property over each TR (zero after the stimulus ends): (n_trs, 3)."""
    t = (np.arange(int(round(n_trs * tr / _DT))) + 0.5) * _DT
    fine = np.stack([props[m].at(t) * (t < seconds) for m in MODALITIES], axis=1)  # (T, 3)
    idx = np.minimum((t / tr).astype(int), n_trs - 1)
    out = np.zeros((n_trs, 3))
    np.add.at(out, idx, fine)
    return out / np.maximum(np.bincount(idx, minlength=n_trs), 1)[:, None]


def _responses(props: dict[str, _Props], seconds: float, tr: float, n_trs: int) -> np.ndarray:
    """HRF-convolved, standardised properties sampled at mid-TR: (n_trs, 3)."""
    t = np.arange(0.0, (n_trs + 1) * tr, _DT)
    fine = np.stack([props[m].at(t) * (t < seconds) for m in MODALITIES], axis=1)  # (T, 3)
    fine = fine - fine[t < seconds].mean(axis=0)
    conv = convolve_hrf(fine, _DT)  # (T, 3)
    idx = np.minimum(np.round((np.arange(n_trs) + 0.5) * tr / _DT).astype(int), len(t) - 1)
    resp = conv[idx]
    return resp / np.maximum(resp.std(axis=0), 1e-8)


def _parcel_truth(cfg: SynthConfig) -> dict[str, np.ndarray]:
    rng = _rng(cfg.seed, "parcels")
    modality = np.full(cfg.parcels, -1, dtype=np.int64)
    if cfg.planted_network:
        pool = np.flatnonzero(parcel_networks(cfg.parcels) == cfg.planted_network)
        n_planted = int(round(cfg.planted_fraction * len(pool)))
        modality[rng.permutation(pool)[:n_planted]] = np.arange(n_planted) % 3
    else:
        n_planted = int(round(cfg.planted_fraction * cfg.parcels))
        modality[rng.permutation(cfg.parcels)[:n_planted]] = np.arange(n_planted) % 3
    snr = np.where(modality >= 0, cfg.snr * 2.0 ** rng.uniform(-1, 1, cfg.parcels), 0.0)
    ceiling = np.sqrt(snr / (1 + snr))
    n_sub = len(SUBJECTS)
    weights = rng.choice([-1.0, 1.0], (n_sub, cfg.parcels)) * rng.uniform(0.5, 1.5, (n_sub, cfg.parcels))
    weights[:, modality < 0] = 0.0
    offset = rng.normal(0.0, 5.0, (n_sub, cfg.parcels))
    scale = rng.uniform(0.5, 2.0, (n_sub, cfg.parcels))
    return {"modality": modality, "snr": snr, "noise_ceiling": ceiling, "weights": weights,
            "offset": offset, "scale": scale}


def _missing(stims: list[_Stim]) -> dict[str, list[str]]:
    """Runs left out on purpose, as in the release (stimulus id, run suffix or None)."""
    train = [s.id for s in stims if s.source == "friends" and s.fmri and not s.id.startswith("s06")]
    suffixed = [s.id for s in stims if s.source == "movie10" and s.id.rstrip("0123456789") in RUN_SUFFIX_MOVIES]
    out: dict[str, list[str]] = {"sub-02": [], "sub-05": []}
    if train:
        out["sub-02"].append(fmri_key(0, train[-1])[len("ses-000_"):])
    if suffixed:
        out["sub-05"].append(fmri_key(0, suffixed[0], 2)[len("ses-000_"):])
    elif len(train) > 1:
        out["sub-05"].append(fmri_key(0, train[0])[len("ses-000_"):])
    return out


def _run_keys(stims: list[_Stim]) -> list[tuple[_Stim, int | None]]:
    out: list[tuple[_Stim, int | None]] = []
    for s in stims:
        if not s.fmri:
            continue
        if s.source == "movie10" and s.id.rstrip("0123456789") in RUN_SUFFIX_MOVIES:
            out += [(s, 1), (s, 2)]
        else:
            out.append((s, None))
    return out


def _progress(enabled: bool):
    if not enabled:
        return nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())


def write_synthetic(out: str | os.PathLike, cfg: SynthConfig, tr: float = 1.49, progress: bool = False) -> Path:
    """Write a synthetic release to ``out`` (a new or empty directory) and return its absolute path.

    Raises DataError if ``out`` exists and is not an empty directory, or if a size is unusable
    (odd frame size, runs shorter than 2 TRs).
    """
    out = Path(out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: already exists; expected a new or empty directory for the synthetic dataset")
    if cfg.width % 2 or cfg.height % 2:
        raise DataError(f"data.synth.width/height = {cfg.width}x{cfg.height}: expected even numbers (H.264 yuv420p)")
    if cfg.seconds < 2 * tr:
        raise DataError(f"data.synth.seconds = {cfg.seconds}: expected at least 2 TRs ({2 * tr} s)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write_all(tmp, cfg, tr, progress)
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_all(root: Path, cfg: SynthConfig, tr: float, progress: bool) -> None:
    stims = _plan(cfg)
    runs = _run_keys(stims)
    missing = _missing(stims)
    parcels = _parcel_truth(cfg)
    n_stim = stimulus_trs(cfg.seconds, tr)
    arrays: dict[str, np.ndarray] = {k: v for k, v in parcels.items()}
    responses: dict[str, np.ndarray] = {}
    meta_runs: dict[str, dict[str, dict]] = {}
    with _progress(progress) as bar:
        task = bar.add_task("stimuli", total=len(stims)) if bar else None
        for st in stims:
            props = _properties(cfg, st)
            video, tsv = stimulus_paths(st.id, st.source)
            (root / video).parent.mkdir(parents=True, exist_ok=True)
            write_mkv(root / video, _frames(cfg, st, props["vision"]), cfg.fps, _audio(cfg, st, props["audio"]),
                      cfg.sample_rate)
            if not (st.source == "ood" and st.id.rstrip("0123456789") in SILENT_MOVIES):
                (root / tsv).parent.mkdir(parents=True, exist_ok=True)
                write_transcript(root / tsv, chunk_words(_words(cfg, st, props["text"]), tr, n_stim))
            arrays[f"property/{st.id}"] = _tr_properties(props, cfg.seconds, tr, n_stim).astype(np.float32)
            responses[st.id] = _responses(props, cfg.seconds, tr, n_stim + 2)
            if bar:
                bar.advance(task)
        task = bar.add_task("fMRI", total=len(SUBJECTS)) if bar else None
        for si, sub in enumerate(SUBJECTS):
            meta_runs[sub] = _write_subject(root, cfg, si, sub, stims, runs, missing.get(sub, []), parcels,
                                            responses, n_stim, arrays)
            if bar:
                bar.advance(task)
    atlas = synthetic_atlas(cfg.parcels, cfg.seed, cfg.atlas_voxel_mm)
    for sub in SUBJECTS:
        path = atlas_path(root, sub)
        path.parent.mkdir(parents=True, exist_ok=True)
        atlas.to_filename(path)
    truth = root / "_truth"
    truth.mkdir()
    np.savez_compressed(truth / "truth.npz", **arrays)
    names = ["none", *MODALITIES]
    (truth / "truth.json").write_text(json.dumps({
        "tr": tr, "seed": cfg.seed, "snr": cfg.snr, "n_parcels": cfg.parcels, "subjects": list(SUBJECTS),
        "modality": [names[m + 1] for m in parcels["modality"]],
        "planted_network": cfg.planted_network,
        "network": [str(n) for n in parcel_networks(cfg.parcels)],
        "snr_per_parcel": [float(x) for x in parcels["snr"]],
        "noise_ceiling": [float(x) for x in parcels["noise_ceiling"]],
        "properties": {"vision": "frame brightness", "audio": "loudness (log amplitude)", "text": "word rate (words/s)"},
        "stimuli": {s.id: {"source": s.source, "seconds": cfg.seconds, "has_fmri": s.fmri} for s in stims},
        "runs": meta_runs, "missing_runs": missing,
    }, indent=1))


def _write_subject(root: Path, cfg: SynthConfig, si: int, sub: str, stims: list[_Stim], runs, missing: list[str],
                   parcels: dict[str, np.ndarray], responses: dict[str, np.ndarray], n_stim: int,
                   arrays: dict[str, np.ndarray]) -> dict[str, dict]:
    rng = _rng(cfg.seed, "fmri", sub)
    func = root / "fmri" / sub / "func"
    func.mkdir(parents=True)
    modality, snr = parcels["modality"], parcels["snr"]
    w, off, scale = parcels["weights"][si], parcels["offset"][si], parcels["scale"][si]
    meta: dict[str, dict] = {}
    sessions = {"friends": 0, "movie10": 0}
    files = {src: h5py.File(func / fmri_file_name(sub, src), "w") for src in ("friends", "movie10")
             if any(s.source == src for s, _ in runs)}
    try:
        for st, run in runs:
            sessions[st.source] += 1
            key = fmri_key(sessions[st.source], st.id, run)
            if key.split("_", 1)[1] in missing:
                continue
            n = n_stim + int(rng.integers(-1, 2))  # lengths differ from the stimulus by up to a TR
            resp = responses[st.id][:n]  # (n, 3)
            drive = np.where(modality[None] >= 0, resp[:, np.maximum(modality, 0)], 0.0)  # (n, P)
            signal = w[None] * drive  # (n, P)
            noise_sd = np.where(snr > 0, np.abs(w) / np.sqrt(np.maximum(snr, 1e-12)), 1.0)  # (P,)
            noise = rng.standard_normal(signal.shape) * noise_sd[None]
            clean = (off[None] + scale[None] * signal).astype(np.float32)
            bold = (off[None] + scale[None] * (signal + noise)).astype(np.float32)
            files[st.source].create_dataset(key, data=bold)
            arrays[f"bold/{sub}/{key}"] = bold
            arrays[f"signal/{sub}/{key}"] = clean
            meta[key] = {"stimulus": st.id, "n_trs": n}
    finally:
        for f in files.values():
            f.close()
    _write_targets(root, cfg, sub, stims, n_stim, rng)
    return meta


def _write_targets(root: Path, cfg: SynthConfig, sub: str, stims: list[_Stim], n_stim: int,
                   rng: np.random.Generator) -> None:
    sets = {
        "friends-s7": [s.id for s in stims if s.source == "friends" and not s.fmri],
        "ood": [s.id for s in stims if s.source == "ood"],
    }
    for name, ids in sets.items():
        if not ids:
            continue
        path = root / target_samples_path(sub, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, {i: n_stim + int(rng.integers(-1, 1)) for i in ids}, allow_pickle=True)


def load_truth(root: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """(truth.json as dict, truth.npz arrays) of a synthetic dataset."""
    truth = Path(root) / "_truth"
    if not (truth / "truth.json").is_file():
        raise DataError(f"{truth / 'truth.json'}: not found; expected a dataset written by `mirage data synth`")
    with np.load(truth / "truth.npz") as z:
        arrays = {k: z[k] for k in z.files}
    return json.loads((truth / "truth.json").read_text()), arrays

