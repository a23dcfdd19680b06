"""Ridge baselines on our feature store: the official Algonauts 2025 challenge recipe, and the
native-fusion linear baseline (Fig. 1a), sharing one ridge machinery.

The official challenge baseline (``code/challenge_baseline_model/`` of the public repository
conpdatasets/algonauts_2025_competitors) is, per subject:

1. stimulus features per TR (1.49 s chunks of the movie); per modality, NaN -> 0, a
   ``StandardScaler`` then a ``PCA`` fit on the train stimuli: 250 components for vision and
   language, every component for audio (its MFCC features are kept whole, the PCA only rotates);
2. the first and last 5 fMRI TRs of every training run left out;
3. fMRI TR t is modelled by the vision and audio features of the ``stimulus_window`` (5) TRs
   ending ``hrf_delay`` (3) TRs before it, shifted to the first or last 5 feature TRs at the run's
   edges, and by the language features of the single TR t - 3;
4. ``sklearn.linear_model.RidgeCV`` with 15 alphas (1e-5 .. 1e6, the official list), one
   alpha per parcel chosen by efficient leave-one-out.

Here the features come from our feature store (its extractors are a slow_r50 video network,
MFCCs and BERT; ours is one backbone): ``official-challenge`` takes one store layer per
modality (``train.baseline.challenge_layer``, a fraction of the depth; 1.0 = the last layer, as
the official extractors read their networks' final representations); ``native_linear`` takes
the layers MIRAGE itself is fed (``model.layers``), concatenated per modality, every modality
reduced to ``pca_components``. Both are scored on the validation runs with the official rule
(``val_r_official``: 5 TRs dropped at both edges of every run, runs concatenated per subject).
sklearn's ``RidgeCV`` is used for both, since it is what the official code uses (its leave-one-out
alpha per target is the recipe) and the designs fit in memory per subject.

:data:`BASELINES` lists every baseline (add one there); the CLI's choices, the fitting code and
the tests read it. Logging a fit to MLflow is :func:`mirage.pipeline.baselines.run_baselines`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mirage.config import MODALITIES, BaselineConfig, Config
from mirage.data.fmri import load_fmri, zscore
from mirage.data.layout import Release
from mirage.data.splits import split_runs
from mirage.errors import DataError
from mirage.features.store import FeatureStore, open_store
from mirage.metrics import EDGE_TRS, concat_trimmed, pearson_r
from mirage.progress import tracked


@dataclass(frozen=True)
class Baseline:
    """One ridge baseline: which store layers it reads and how far each modality is reduced.

    Attributes:
        name: the name the CLI (``mirage baseline --which``) and MLflow (``mirage.baseline`` tag) use.
        summary: one line on what it is.
        layers: (config, the store's layer count) -> the store layers it reads.
        components: (baseline config, modality) -> PCA components kept (None: every component).
    """

    name: str
    summary: str
    layers: Callable[[Config, int], list[int]]
    components: Callable[[BaselineConfig, str], int | None]


def _challenge_layer(cfg: Config, n_layers: int) -> list[int]:
    return [min(n_layers - 1, int(round(cfg.train.baseline.challenge_layer * (n_layers - 1))))]


def _challenge_components(bc: BaselineConfig, modality: str) -> int | None:
    return bc.audio_pca_components if modality == "audio" else bc.pca_components


def _model_layers(cfg: Config, n_layers: int) -> list[int]:
    return list(range(n_layers)) if cfg.model.layers is None else [i % n_layers for i in cfg.model.layers]


def _pca_components(bc: BaselineConfig, modality: str) -> int | None:
    return bc.pca_components


BASELINES: dict[str, Baseline] = {
    b.name: b
    for b in (
        Baseline("official-challenge", "the official Algonauts 2025 recipe on one store layer per modality",
                 _challenge_layer, _challenge_components),
        Baseline("native_linear", "ridge on the layers MIRAGE is fed (model.layers), every modality PCA-reduced",
                 _model_layers, _pca_components),
    )
}
"""Every baseline, by name."""

WINDOWED = ("vision", "audio")
"""Modalities modelled by a window of TRs; the others (text) by a single TR."""


@dataclass
class BaselineResult:
    """Validation scores and fitted objects of one baseline.

    Attributes:
        name: baseline name.
        val_r: mean over subjects of the mean over parcels, every TR of the concatenated runs.
        val_r_official: the same with the official edge rule (5 TRs dropped per run edge).
        val_r_subject: subject -> official-form r.
        r: (n_subjects, n_parcels) per-parcel official-form validation r (NaN rows: no validation data).
        alphas: (n_subjects, n_parcels) chosen ridge alphas.
        layers: store layers used.
        reducers: modality -> fitted (StandardScaler, PCA).
        models: subject -> fitted RidgeCV.
        n_train_rows: subject -> rows of the training design (edges excluded).
    """

    name: str
    val_r: float
    val_r_official: float
    val_r_subject: dict[str, float]
    r: np.ndarray
    alphas: np.ndarray
    layers: list[int]
    reducers: dict[str, Any] = field(default_factory=dict, repr=False)
    models: dict[str, Any] = field(default_factory=dict, repr=False)
    n_train_rows: dict[str, int] = field(default_factory=dict)


# ------------------------------------------------------------------ TR features


def tr_average(features: np.ndarray, n_trs: int, tr: float, rate_hz: float) -> np.ndarray:
    """Average feature frames per TR.

    Frame i holds the cutoff at (i + 1) / rate_hz s and belongs to the TR in which that time falls
    (TR t spans (t * tr, (t + 1) * tr]); a TR without a frame takes the previous TR's average.

    Args:
        features: (n_frames, n_features).
    Returns:
        (n_trs, n_features) float32.
    """
    n_frames = features.shape[0]
    tr_of = np.ceil((np.arange(n_frames) + 1) / rate_hz / tr - 1e-9).astype(int) - 1  # (n_frames,)
    keep = tr_of < n_trs
    sums = np.zeros((n_trs, features.shape[1]), np.float64)
    np.add.at(sums, tr_of[keep], features[keep].astype(np.float64))
    counts = np.bincount(tr_of[keep], minlength=n_trs)[:n_trs]
    out = np.zeros_like(sums)
    last = np.zeros(features.shape[1])
    for t in range(n_trs):  # loop over TRs (not parcels or features): fills empty TRs forward
        if counts[t]:
            last = sums[t] / counts[t]
        out[t] = last
    return out.astype(np.float32)


def stimulus_trs(n_frames: int, rate_hz: float, tr: float) -> int:
    """Whole TRs of a stimulus with ``n_frames`` feature frames (the official chunking drops a last partial TR)."""
    return max(int(math.floor(n_frames / rate_hz / tr + 1e-9)), 1)


# ----------------------------------------------------------------------- design


def window_index(n_trs: int, n_feat: int, hrf_delay: int, window: int) -> np.ndarray:
    """Feature TRs of the window modelling each fMRI TR (official rule).

    Row t holds ``t - hrf_delay - window + 1 .. t - hrf_delay``, shifted to ``0 .. window - 1``
    when it would start before the run and to the last ``window`` feature TRs when it would end
    past them (a run shorter than ``window`` repeats its last TR).

    Returns:
        int (n_trs, window).
    """
    start = np.arange(n_trs) - hrf_delay - window + 1  # (n_trs,)
    start = np.clip(start, 0, max(n_feat - window, 0))
    idx = start[:, None] + np.arange(window)[None, :]  # (n_trs, window)
    return np.minimum(idx, n_feat - 1)


def single_index(n_trs: int, n_feat: int, hrf_delay: int) -> np.ndarray:
    """Feature TR modelling each fMRI TR for the single-TR modality (text): t - hrf_delay, clipped to the run.

    Returns:
        int (n_trs,).
    """
    return np.clip(np.arange(n_trs) - hrf_delay, 0, n_feat - 1)


def design_matrix(reduced: dict[str, np.ndarray], n_trs: int, bc: BaselineConfig) -> np.ndarray:
    """The ridge design of one run.

    Args:
        reduced: modality -> (n_feature_trs, k_m) reduced features of the stimulus.
        n_trs: fMRI TRs of the run.
    Returns:
        (n_trs, sum over modalities of k_m * (window if windowed else 1)) float32.
    """
    parts = []
    for m in MODALITIES:
        if m not in reduced:
            continue
        x = reduced[m]
        if m in WINDOWED:
            idx = window_index(n_trs, len(x), bc.hrf_delay_trs, bc.stimulus_window)
            parts.append(x[idx].reshape(n_trs, -1))  # (n_trs, window * k)
        else:
            parts.append(x[single_index(n_trs, len(x), bc.hrf_delay_trs)])  # (n_trs, k)
    return np.concatenate(parts, axis=1).astype(np.float32)


def train_rows(n_trs: int, excluded: int) -> slice:
    """The fMRI TRs of a training run that enter the fit: the first and last ``excluded`` left out."""
    if n_trs <= 2 * excluded:
        raise DataError(f"a training run of {n_trs} TRs has nothing left after excluding {excluded} TRs at each edge")
    return slice(excluded, n_trs - excluded)


# --------------------------------------------------------------- fitted pieces


def fit_reducer(x: np.ndarray, n_components: int | None, seed: int):
    """StandardScaler then PCA on the train stimuli's feature TRs of one modality.

    Args:
        x: (n_rows, n_features); NaN -> 0 first.
        n_components: kept components (capped by the data's rank bound); None = all.
    Returns:
        (scaler, pca), both fitted.
    """
    from sklearn.decomposition import PCA  # ~2.5 s to import, and `mirage --help` reads BASELINES
    from sklearn.preprocessing import StandardScaler

    x = np.nan_to_num(np.asarray(x, np.float32))
    scaler = StandardScaler().fit(x)
    full = min(x.shape)
    k = full if n_components is None else min(n_components, full)
    pca = PCA(n_components=k, random_state=seed).fit(scaler.transform(x))
    return scaler, pca


def reduce(reducer, x: np.ndarray) -> np.ndarray:
    """(n_rows, n_features) -> (n_rows, k) float32 with a fitted (scaler, pca)."""
    scaler, pca = reducer
    return pca.transform(scaler.transform(np.nan_to_num(np.asarray(x, np.float32)))).astype(np.float32)


def fit_ridge(x: np.ndarray, y: np.ndarray, alphas: list[float]):
    """``RidgeCV`` with one alpha per target (parcel), efficient leave-one-out, as the official baseline.

    x: (n_rows, n_features); y: (n_rows, n_parcels).
    """
    from sklearn.linear_model import RidgeCV  # ~2.5 s to import, and `mirage --help` reads BASELINES

    return RidgeCV(alphas=np.asarray(alphas, np.float64), cv=None, alpha_per_target=True).fit(x, y)


# ----------------------------------------------------------------------- fitting


class _Stimuli:
    """TR features of the stimuli of one baseline's layers, read once each from the store."""

    def __init__(self, cfg: Config, store: FeatureStore, layers: list[int]):
        self.cfg, self.store, self.layers = cfg, store, layers
        self._cache: dict[str, dict[str, np.ndarray]] = {}

    def trs(self, stimulus_id: str) -> dict[str, np.ndarray]:
        """modality -> (n_feature_trs, n_layers' * dim) float32."""
        if stimulus_id not in self._cache:
            arr = self.store.read(stimulus_id)  # (n_frames, 3, L, D) float16 memmap
            n = stimulus_trs(arr.shape[0], self.store.rate_hz, self.cfg.data.tr)
            self._cache[stimulus_id] = {
                m: tr_average(np.asarray(arr[:, mi][:, self.layers]).reshape(arr.shape[0], -1), n,
                              self.cfg.data.tr, self.store.rate_hz)
                for mi, m in enumerate(MODALITIES)
            }
        return self._cache[stimulus_id]


def _runs(cfg: Config, split: str) -> list:
    return [r for r in split_runs(Release(cfg.data.root), cfg.data, split) if r.subject in cfg.data.subjects]


def _fmri(cfg: Config, run) -> np.ndarray:
    y = load_fmri(str(run.path), run.key)
    return zscore(y) if cfg.data.zscore else y


def fit_baseline(
    cfg: Config, name: str, store: FeatureStore | None = None, progress: bool = False
) -> BaselineResult:
    """Fit one baseline of :data:`BASELINES` on the train split (per subject) and score it on the validation split.

    ``store``: the feature store (default: the one of ``cfg.features``); ``progress``: show the
    subjects done on stderr (:func:`mirage.progress.tracked`).
    """
    if name not in BASELINES:
        raise DataError(f"baseline {name!r}: expected one of {sorted(BASELINES)}")
    baseline = BASELINES[name]
    bc = cfg.train.baseline
    store = store if store is not None else open_store(cfg.features)
    layers = baseline.layers(cfg, store.n_layers)
    train, val = _runs(cfg, "train"), _runs(cfg, "val")
    if not train or not val:
        raise DataError(f"{cfg.data.root}: baseline {name} needs fMRI runs in both the train and val splits")
    stim = _Stimuli(cfg, store, layers)

    # scaler + PCA per modality on the train stimuli (each stimulus once)
    train_ids = sorted({r.stimulus_id for r in train})
    reducers = {
        m: fit_reducer(np.concatenate([stim.trs(s)[m] for s in train_ids]), baseline.components(bc, m), bc.pca_seed)
        for m in MODALITIES
    }
    reduced: dict[str, dict[str, np.ndarray]] = {}

    def design(run, n_trs: int) -> np.ndarray:
        if run.stimulus_id not in reduced:
            reduced[run.stimulus_id] = {m: reduce(reducers[m], x) for m, x in stim.trs(run.stimulus_id).items()}
        return design_matrix(reduced[run.stimulus_id], n_trs, bc)

    subjects = list(cfg.data.subjects)
    models, n_rows, r_sub, r_all_sub, alphas_sub = {}, {}, {}, {}, {}
    for s in tracked(subjects, f"baseline {name}", progress):
        xs, ys = [], []
        for run in (r for r in train if r.subject == s):
            y = _fmri(cfg, run)
            keep = train_rows(len(y), bc.excluded_edge_trs)
            xs.append(design(run, len(y))[keep])
            ys.append(y[keep])
        vruns = [r for r in val if r.subject == s]
        if not xs or not vruns:
            continue
        model = fit_ridge(np.concatenate(xs), np.concatenate(ys), bc.alphas)
        models[s], n_rows[s] = model, sum(len(x) for x in xs)
        yv = [_fmri(cfg, r) for r in vruns]
        pv = [model.predict(design(r, len(y))) for r, y in zip(vruns, yv)]
        r_sub[s] = pearson_r(concat_trimmed(pv, EDGE_TRS), concat_trimmed(yv, EDGE_TRS))  # (P,)
        r_all_sub[s] = pearson_r(np.concatenate(pv), np.concatenate(yv))
        alphas_sub[s] = np.broadcast_to(np.asarray(model.alpha_, float), (yv[0].shape[1],))
    if not r_sub:
        raise DataError(f"{cfg.data.root}: no subject has fMRI in both the train and val splits")
    n_parcels = len(next(iter(r_sub.values())))
    r = np.full((len(subjects), n_parcels), np.nan, np.float32)
    alphas = np.full((len(subjects), n_parcels), np.nan)
    for i, s in enumerate(subjects):
        if s in r_sub:
            r[i], alphas[i] = r_sub[s], alphas_sub[s]
    per = {s: float(np.mean(v)) for s, v in r_sub.items()}
    return BaselineResult(
        name=name,
        val_r=float(np.mean([np.mean(v) for v in r_all_sub.values()])),
        val_r_official=float(np.mean(list(per.values()))),
        val_r_subject=per,
        r=r,
        alphas=alphas,
        layers=layers,
        reducers=reducers,
        models=models,
        n_train_rows=n_rows,
    )
