"""Ridge baselines on our feature store, the paper's comparison points.

Both follow the Algonauts 2025 challenge baseline recipe: features averaged per TR, PCA per
modality fit on the train split, the ``stimulus_window`` TRs ending ``hrf_delay_trs`` TRs before
each fMRI sample concatenated, and a RidgeCV per subject that picks one alpha per parcel
(leave-one-out). They differ in the features:

- ``challenge``: one hidden state per modality (``train.baseline.challenge_layer`` of the depth);
- ``native_linear``: the layers MIRAGE itself is fed (``model.layers``), concatenated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mirage.config import MODALITIES, Config
from mirage.errors import DataError

BASELINES: dict[str, Callable[[Config, int], list[int]]] = {
    "challenge": lambda cfg, n: [min(n - 1, int(round(cfg.train.baseline.challenge_layer * (n - 1))))],
    "native_linear": lambda cfg, n: list(range(n)) if cfg.model.layers is None else [i % n for i in cfg.model.layers],
}


@dataclass
class BaselineResult:
    """Validation scores of one baseline.

    Attributes:
        name: baseline name.
        val_r: mean over subjects of the mean over parcels.
        val_r_subject: subject -> mean r over parcels.
        r: (n_subjects, n_parcels) per-parcel validation r (NaN rows: subject without validation data).
        alphas: (n_subjects, n_parcels) chosen ridge alphas.
        layers: store layer indices used.
    """

    name: str
    val_r: float
    val_r_subject: dict[str, float]
    r: np.ndarray
    alphas: np.ndarray
    layers: list[int]


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


def delay_window(x: np.ndarray, hrf_delay: int, window: int) -> np.ndarray:
    """Row t holds rows t - hrf_delay - window + 1 .. t - hrf_delay of ``x`` (clipped to the run), concatenated.

    Args:
        x: (n_trs, n_features).
    Returns:
        (n_trs, window * n_features).
    """
    n = x.shape[0]
    idx = np.arange(n)[:, None] - hrf_delay - window + 1 + np.arange(window)[None, :]  # (n_trs, window)
    return x[np.clip(idx, 0, n - 1)].reshape(n, -1)


def _pearson_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Column-wise Pearson r of (n, P) arrays; 0 for constant columns."""
    a = a - a.mean(0)
    b = b - b.mean(0)
    den = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    return np.where(den > 0, (a * b).sum(0) / np.where(den > 0, den, 1), 0.0)


class _RunTable:
    """The fMRI runs of a split with their stimulus TR features, read one stimulus at a time."""

    def __init__(self, cfg: Config, split: str, store, layers: list[int]):
        from mirage.data.layout import Release
        from mirage.data.splits import split_runs

        self.cfg, self.store, self.layers = cfg, store, layers
        self.runs = [r for r in split_runs(Release(cfg.data.root), cfg.data, split) if r.subject in cfg.data.subjects]

    def stimulus_trs(self, stimulus_id: str, n_trs: int) -> dict[str, np.ndarray]:
        """modality -> (n_trs, n_layers * dim) TR-averaged features (stimulus TRs past the end repeat the last)."""
        arr = self.store.read(stimulus_id)  # (n_frames, 3, L, D) float16 memmap
        out = {}
        for mi, m in enumerate(MODALITIES):
            feats = np.asarray(arr[:, mi][:, self.layers]).reshape(arr.shape[0], -1)  # (n_frames, L' * D)
            out[m] = tr_average(feats, n_trs, self.cfg.data.tr, self.store.rate_hz)
        return out


def fit_baseline(cfg: Config, name: str, store=None) -> BaselineResult:
    """Fit one baseline on the train split and score it on the validation split."""
    from sklearn.decomposition import IncrementalPCA
    from sklearn.linear_model import RidgeCV

    from mirage.data.fmri import load_fmri, zscore
    from mirage.features.store import open_store

    if name not in BASELINES:
        raise DataError(f"baseline {name!r}: expected one of {sorted(BASELINES)}")
    bc = cfg.train.baseline
    store = store if store is not None else open_store(cfg.features)
    layers = BASELINES[name](cfg, store.n_layers)
    train, val = _RunTable(cfg, "train", store, layers), _RunTable(cfg, "val", store, layers)
    if not train.runs or not val.runs:
        raise DataError(f"{cfg.data.root}: baseline {name} needs fMRI runs in both the train and val splits")

    # PCA per modality on the train stimuli, streamed one stimulus at a time
    def stim_trs(table: _RunTable, run) -> dict[str, np.ndarray]:
        n = _fmri_len(run)
        return table.stimulus_trs(run.stimulus_id, n)

    train_stims = {r.stimulus_id: r for r in train.runs}
    total_rows = sum(_fmri_len(r) for r in train_stims.values())
    n_feat = len(layers) * store.dim
    k = min(bc.pca_components, total_rows, n_feat)
    pcas = {m: IncrementalPCA(n_components=k) for m in MODALITIES}
    bufs: dict[str, list[np.ndarray]] = {m: [] for m in MODALITIES}
    fitted = False
    for run in train_stims.values():
        for m, x in stim_trs(train, run).items():
            bufs[m].append(x)
        if sum(len(b) for b in bufs[MODALITIES[0]]) >= max(k, 256):
            for m in MODALITIES:
                pcas[m].partial_fit(np.concatenate(bufs[m]))
                bufs[m] = []
            fitted = True
    if bufs[MODALITIES[0]] and (not fitted or sum(len(b) for b in bufs[MODALITIES[0]]) >= k):
        for m in MODALITIES:
            pcas[m].partial_fit(np.concatenate(bufs[m]))

    def design(table: _RunTable, run) -> np.ndarray:
        parts = [pcas[m].transform(x) for m, x in stim_trs(table, run).items()]  # 3 x (n_trs, k)
        return delay_window(np.concatenate(parts, 1), bc.hrf_delay_trs, bc.stimulus_window)  # (n_trs, 3*k*window)

    subjects = list(cfg.data.subjects)
    n_parcels = None
    r_all, alphas_all = {}, {}
    mu = sd = None
    for s in subjects:
        xs, ys = [], []
        for run in (r for r in train.runs if r.subject == s):
            xs.append(design(train, run))
            ys.append(zscore(load_fmri(str(run.path), run.key)))
        if not xs:
            continue
        X, Y = np.concatenate(xs), np.concatenate(ys)
        if mu is None:  # standardise the design with train statistics (shared across subjects)
            mu, sd = X.mean(0), X.std(0)
            sd = np.where(sd > 0, sd, 1)
        ridge = RidgeCV(alphas=bc.alphas, alpha_per_target=True).fit((X - mu) / sd, Y)
        xv = [design(val, run) for run in val.runs if run.subject == s]
        if not xv:
            continue
        yv = [zscore(load_fmri(str(run.path), run.key)) for run in val.runs if run.subject == s]
        pred = ridge.predict((np.concatenate(xv) - mu) / sd)
        r_all[s] = _pearson_columns(pred, np.concatenate(yv))
        alphas_all[s] = np.broadcast_to(np.asarray(ridge.alpha_, float), (Y.shape[1],))
        n_parcels = Y.shape[1]
    if not r_all:
        raise DataError(f"{cfg.data.root}: no subject has fMRI in both the train and val splits")
    r = np.full((len(subjects), n_parcels), np.nan, np.float32)
    alphas = np.full((len(subjects), n_parcels), np.nan)
    for i, s in enumerate(subjects):
        if s in r_all:
            r[i], alphas[i] = r_all[s], alphas_all[s]
    per = {s: float(np.mean(r_all[s])) for s in r_all}
    return BaselineResult(name, float(np.mean(list(per.values()))), per, r, alphas, layers)


def _fmri_len(run) -> int:
    from mirage.train.data import _fmri_shape

    return _fmri_shape(str(run.path), run.key)[0]


def run_baselines(cfg: Config, names: list[str] | None = None, *, track: bool = True) -> list[BaselineResult]:
    """Fit and score baselines; each is an MLflow run (``mirage.kind=baseline``) when ``track``."""
    import tempfile
    from pathlib import Path

    from mirage import tracking

    out = []
    for name in names or list(BASELINES):
        if not track:
            out.append(fit_baseline(cfg, name))
            continue
        with tracking.tracked_run(cfg, "baseline", f"baseline-{name}", tags={"mirage.baseline": name}) as run_id:
            res = fit_baseline(cfg, name)
            tracking.log_metrics(
                cfg.tracking.uri, run_id,
                {"val_r": res.val_r, **{f"val_r/{s}": v for s, v in res.val_r_subject.items()}}, step=0,
            )
            with tempfile.TemporaryDirectory() as d:
                np.save(Path(d) / "val_r.npy", res.r)
                np.save(Path(d) / "alphas.npy", res.alphas)
                tracking.log_artifacts(cfg.tracking.uri, run_id, d, "validation")
            out.append(res)
    return out
