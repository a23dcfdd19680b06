"""Linear probes on the stages of a trained model (Fig. 3c).

For each validation run, the model's intermediate representations are read at four stages and
brought to TR resolution the way the prediction is (the run's prediction windows, frames averaged
to ``data.window_trs`` TRs per window, then stitched):

- ``input``: the store features averaged over the layers the model reads, modalities concatenated;
- ``layer_pool``: after the layer gates: each modality's pooled layers through its projection, the
  fused vector the brain encoder reads (``hidden_dim`` wide);
- ``encoder``: the brain encoder's output, before the subject head;
- ``output``: the model's prediction.

``pooled`` (not among the default stages) probes the layer poolers' raw outputs, modalities
concatenated (``n_queries * dim`` per modality for cross-attention: wide on real backbones).

Per subject and stage, a ridge regression (standardised features, one penalty per parcel chosen on
held-out runs of the training runs) maps the stage to the measured fMRI, fitted on some runs and
scored on held-out whole runs (folds of runs, so a probe cannot fit a run's own noise); r per parcel
is taken over the held-out predictions of all folds. Pure torch/numpy: no Ray, no MLflow.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mirage.analysis import finish_figure
from mirage.config import Config
from mirage.data.windows import windows_for_prediction
from mirage.errors import DataError, MirageError
from mirage.features.model_inputs import model_inputs, window_rows
from mirage.metrics import pearson_r
from mirage.predictor import Predictor, RunRequest

STAGES = ("input", "layer_pool", "encoder", "output")
"""Probe stages, from the backbone features to the model's prediction (the default set)."""
EXTRA_STAGES = ("pooled",)
"""Stages probed only when asked for."""

DEFAULT_ALPHAS = tuple(float(a) for a in np.logspace(-1, 6, 8))
"""Ridge penalties searched per parcel (on standardised stage features)."""


@dataclass
class ProbeResult:
    """Cross-validated probe r per stage.

    ``r``: stage -> (n_subjects, n_parcels); ``model_r``: (n_subjects, n_parcels) the model's own r
    on the same runs (all runs concatenated per subject); ``n_runs``: runs per subject.
    """

    stages: list[str]
    subjects: list[str]
    r: dict[str, np.ndarray]
    model_r: np.ndarray
    n_runs: dict[str, int]

    def mean_r(self) -> dict[str, float]:
        """stage -> r averaged over subjects and parcels (``model`` for the model's own)."""
        return {**{s: float(self.r[s].mean()) for s in self.stages}, "model": float(self.model_r.mean())}

    def subject_r(self) -> dict[str, np.ndarray]:
        """stage -> (n_subjects,) r averaged over parcels."""
        return {s: self.r[s].mean(axis=1) for s in self.stages}


def _check_stages(stages: Sequence[str]) -> list[str]:
    bad = [s for s in stages if s not in STAGES + EXTRA_STAGES]
    if bad or not stages:
        raise MirageError(f"probe stages {list(stages)}: expected a non-empty subset of {list(STAGES + EXTRA_STAGES)}")
    return list(stages)


def stage_features(
    predictor: Predictor, runs: Sequence[RunRequest], stages: Sequence[str] = STAGES
) -> list[dict[str, np.ndarray]]:
    """The stages of the predictor's model on every TR of every run.

    Args:
        predictor: a single model (an ensemble's members are probed one at a time: ``predictor.member(i)``).
        runs: features (n_frames, 3, n_layers, dim), subject, n_trs.
        stages: a subset of :data:`STAGES` and :data:`EXTRA_STAGES`.

    Returns:
        per run: stage -> (n_trs, d_stage) float32.
    """
    stages = _check_stages(stages)
    if len(predictor.members) != 1:
        raise MirageError(f"stage probes read one model; {predictor.source} holds {len(predictor.members)} (use .member(i))")
    member = predictor.members[0]
    model = member.model
    for r in runs:
        predictor.check_run(r.features, r.subject, r.n_trs)
    jobs = [(i, w) for i, r in enumerate(runs)
            for w in windows_for_prediction(int(r.n_trs), predictor.cfg.data, predictor.rate_hz, r.features.shape[0])]
    outs: list[dict[str, np.ndarray]] = [{} for _ in runs]
    model.eval()
    for start in range(0, len(jobs), predictor.window_batch):
        chunk = jobs[start : start + predictor.window_batch]
        sid = torch.tensor([predictor.subject_index(runs[i].subject) for i, _ in chunk], device=predictor.device)
        rows = np.stack([window_rows(runs[i].features, w.frame_start, w.frame_stop, member.layers) for i, w in chunk])
        x = model_inputs(rows, predictor.modalities, predictor.device)  # modality -> (B, L, T, D)
        with torch.no_grad():
            trace = model.trace(x, sid)
            per_frame = {
                "input": torch.cat([x[m].mean(dim=1) for m in model.modalities], dim=-1),  # (B, T, sum D)
                "layer_pool": trace["fused"],  # (B, T, dim)
                "pooled": torch.cat([trace[f"pooled_{m}"] for m in model.modalities], dim=-1),  # (B, T, sum out)
                "encoder": trace["temporal"],  # (B, T, dim)
            }
            by_tr = {s: (trace["prediction"] if s == "output" else model.pool_time(per_frame[s])) for s in stages}
        for s, y in by_tr.items():
            y = y.float().cpu().numpy()  # (B, window_trs, d)
            for (i, w), yb in zip(chunk, y):
                if s not in outs[i]:
                    outs[i][s] = np.full((int(runs[i].n_trs), y.shape[-1]), np.nan, np.float32)
                outs[i][s][w.tr_start : w.tr_start + w.n_valid] = yb[: w.n_valid]
    for i, o in enumerate(outs):
        if any(np.isnan(a).any() for a in o.values()):
            raise RuntimeError(f"run {i}: windows left TRs without stage features (window plan does not cover the run)")
    return outs


def _ridge_path(X: np.ndarray, Y: np.ndarray, Xt: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """Ridge predictions on ``Xt`` for every penalty: (n_alphas, n_test, P).

    One eigendecomposition of the centred rows' smaller Gram matrix (features x features, or rows x
    rows when there are more features than rows) serves every penalty.
    """
    xm, ym = X.mean(axis=0), Y.mean(axis=0)
    Xc, Yc, Xtc = X - xm, Y - ym, Xt - xm
    if Xc.shape[1] <= Xc.shape[0]:
        evals, V = np.linalg.eigh(Xc.T.astype(np.float64) @ Xc)  # (d,), (d, d)
        keep = evals > evals.max() * 1e-10
        evals, V = evals[keep], V[:, keep]
        proj = Xtc @ V  # (n_test, k): test rows in the right singular basis
        vty = V.T @ (Xc.T @ Yc)  # (k, P) = s * U^T Y
        coef = 1.0 / (evals[None, :] + alphas[:, None])  # (A, k)
        return np.einsum("tk,ak,kp->atp", proj, coef, vty) + ym
    evals, U = np.linalg.eigh(Xc.astype(np.float64) @ Xc.T)  # (n,), (n, n)
    keep = evals > evals.max() * 1e-10
    evals, U = evals[keep], U[:, keep]
    kt = (Xtc @ Xc.T) @ U  # (n_test, k) = s * (test rows in the right singular basis)
    uty = U.T @ Yc  # (k, P)
    coef = 1.0 / (evals[None, :] + alphas[:, None])  # (A, k)
    return np.einsum("tk,ak,kp->atp", kt, coef, uty) + ym


def _groups(runs: list[int], n_trs: list[int], n_folds: int) -> list[list[tuple[int, slice]]]:
    """Held-out groups for choosing the penalty: up to ``n_folds`` groups of whole runs, or the halves of a single run."""
    if len(runs) >= 2:
        k = min(n_folds, len(runs))
        return [[(i, slice(None)) for i in runs[g::k]] for g in range(k)]
    (i,) = runs
    half = n_trs[i] // 2
    return [[(i, slice(0, half))], [(i, slice(half, None))]]


def _fit_predict(xs, ys, train: list[int], test: list[int], alphas: np.ndarray, n_folds: int) -> list[np.ndarray]:
    """Standardise on ``train``, pick a penalty per parcel on held-out groups of ``train``, predict ``test``."""
    def rows(arrs, parts):
        return np.concatenate([arrs[i][sl] for i, sl in parts])

    everything = [(i, slice(None)) for i in train]
    X = rows(xs, everything).astype(np.float64)
    mu, sd = X.mean(axis=0), X.std(axis=0)
    sd[sd < 1e-8] = 1.0
    del X
    zs = [((np.asarray(x, np.float64) - mu) / sd).astype(np.float32) for x in xs]
    ys = [np.asarray(y, np.float64) for y in ys]
    groups = _groups(train, [len(x) for x in xs], n_folds)
    score = np.zeros((len(alphas), ys[train[0]].shape[1]))
    for g in range(len(groups)):
        fit_parts = [p for h, grp in enumerate(groups) if h != g for p in grp]
        pred = _ridge_path(rows(zs, fit_parts), rows(ys, fit_parts), rows(zs, groups[g]), alphas)  # (A, n, P)
        score += pearson_r(pred, np.broadcast_to(rows(ys, groups[g]), pred.shape))
    best = score.argmax(axis=0)  # (P,)
    pred = _ridge_path(rows(zs, everything), rows(ys, everything), np.concatenate([zs[i] for i in test]), alphas)
    chosen = np.take_along_axis(pred, best[None, None, :].repeat(pred.shape[1], axis=1), axis=0)[0]  # (n_test, P)
    bounds = np.cumsum([0] + [len(xs[i]) for i in test])
    return [chosen[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _probe_subject(xs: list[np.ndarray], ys: list[np.ndarray], alphas: Sequence[float], n_folds: int) -> np.ndarray:
    """Held-out-run r per parcel of a ridge from ``xs`` (runs (n_trs, d)) to ``ys`` (runs (n_trs, P)).

    Folds of whole runs; inside each fold's training runs, the penalty of every parcel is the one
    whose predictions of held-out groups of training runs correlate best (nested, run-wise).
    """
    k = min(n_folds, len(xs))
    a = np.asarray(alphas, dtype=np.float64)
    preds: list[np.ndarray | None] = [None] * len(xs)
    for fold in range(k):
        test = [i for i in range(len(xs)) if i % k == fold]
        train = [i for i in range(len(xs)) if i % k != fold]
        for i, p in zip(test, _fit_predict(xs, ys, train, test, a, n_folds)):
            preds[i] = p
    return pearson_r(np.concatenate(preds), np.concatenate(ys))


def fit_probes(
    features: Mapping[str, Mapping[str, Sequence[np.ndarray]]],
    targets: Mapping[str, Sequence[np.ndarray]],
    *,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    n_folds: int = 5,
) -> dict[str, np.ndarray]:
    """Cross-validated ridge probes, per stage and subject.

    Args:
        features: stage -> subject -> runs, each (n_trs, d).
        targets: subject -> runs, each (n_trs, n_parcels), the same runs in the same order.
        alphas: ridge penalties searched per parcel; n_folds: folds of whole runs (at most one per run).

    Returns:
        stage -> (n_subjects, n_parcels) r on held-out runs, subjects in ``targets`` order.

    Raises:
        DataError: a subject has fewer than two runs, or runs whose lengths differ between stage and fMRI.
    """
    if n_folds < 2:
        raise MirageError(f"fit_probes: n_folds={n_folds}; expected >= 2 (folds of held-out runs)")
    out = {}
    for stage, by_subject in features.items():
        rows = []
        for sub, ys in targets.items():
            xs = list(by_subject.get(sub, []))
            if len(ys) < 2:
                raise DataError(f"probe {stage}/{sub}: {len(ys)} validation run(s); expected >= 2 to hold runs out")
            if len(xs) != len(ys) or any(len(x) != len(y) for x, y in zip(xs, ys)):
                raise DataError(
                    f"probe {stage}/{sub}: stage runs {[len(x) for x in xs]} TRs vs fMRI runs {[len(y) for y in ys]}"
                )
            rows.append(_probe_subject(xs, list(ys), alphas, n_folds))
        out[stage] = np.stack(rows)
    return out


def stage_probes(
    predictor: Predictor,
    runs: Sequence[RunRequest],
    targets: Sequence[np.ndarray],
    *,
    stages: Sequence[str] = STAGES,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    n_folds: int = 5,
) -> ProbeResult:
    """Probe every stage of one model on the given runs; ``targets[i]`` is (runs[i].n_trs, n_parcels) fMRI."""
    stages = _check_stages(stages)
    if len(runs) != len(targets):
        raise DataError(f"stage_probes: {len(runs)} runs but {len(targets)} fMRI targets")
    wanted = list(dict.fromkeys([*stages, "output"]))
    feats = stage_features(predictor, runs, wanted)
    subjects = list(dict.fromkeys(r.subject for r in runs))
    by_sub = {s: [i for i, r in enumerate(runs) if r.subject == s] for s in subjects}
    y = {s: [np.asarray(targets[i], dtype=np.float32) for i in idx] for s, idx in by_sub.items()}
    per_stage = {st: {s: [feats[i][st] for i in idx] for s, idx in by_sub.items()} for st in stages}
    r = fit_probes(per_stage, y, alphas=alphas, n_folds=n_folds)
    model_r = np.stack([
        pearson_r(np.concatenate([feats[i]["output"] for i in idx]), np.concatenate(y[s])) for s, idx in by_sub.items()
    ])
    return ProbeResult(stages, subjects, r, model_r, {s: len(idx) for s, idx in by_sub.items()})


def validation_probes(
    model: str | os.PathLike | Predictor,
    cfg: Config,
    *,
    stages: Sequence[str] = STAGES,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    n_folds: int = 5,
    device: str | torch.device | None = None,
) -> ProbeResult:
    """:func:`stage_probes` on every validation run of ``cfg`` (``data.val`` of ``data.root``, features from
    ``features.store``) whose subject the model knows; fMRI z-scored per run when ``data.zscore``.

    Args:
        model: an exported model directory or a single-model :class:`Predictor`.
    """
    from mirage.data.fmri import load_fmri, zscore
    from mirage.features.store import open_store
    from mirage.predictor import stored_runs
    from mirage.valpred import validation_keys

    predictor = model if isinstance(model, Predictor) else Predictor.from_path(model, device=device)
    keys = [(k, r) for k, r in validation_keys(cfg) if k.subject in predictor.subjects]
    if not keys:
        raise DataError(f"no validation fMRI under {cfg.data.root} for data.val={cfg.data.val} and subjects {predictor.subjects}")
    targets = [load_fmri(r.path, r.key) for _, r in keys]
    if cfg.data.zscore:
        targets = [zscore(t) for t in targets]
    store = open_store(cfg.features)
    runs = stored_runs(store, {k: len(t) for (k, _), t in zip(keys, targets)})
    return stage_probes(predictor, runs, targets, stages=stages, alphas=alphas, n_folds=n_folds)


def write_probes(res: ProbeResult, out_dir: str | os.PathLike, on_figure=None) -> list[Path]:
    """``probe_r_<stage>.npy`` (n_subjects, n_parcels), ``probe_model_r.npy``, ``probes.json`` and ``probes.png``;
    ``on_figure("probes", fig)`` sees the plot before it is closed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for s in res.stages:
        np.save(out / f"probe_r_{s}.npy", res.r[s].astype(np.float32))
        files.append(out / f"probe_r_{s}.npy")
    np.save(out / "probe_model_r.npy", res.model_r.astype(np.float32))
    files.append(out / "probe_model_r.npy")
    sub_r = res.subject_r()
    summary = {
        "subjects": res.subjects, "stages": res.stages, "n_runs": res.n_runs, "mean_r": res.mean_r(),
        "subject_r": {s: dict(zip(res.subjects, map(float, sub_r[s]))) for s in res.stages},
        "model_subject_r": dict(zip(res.subjects, map(float, res.model_r.mean(axis=1)))),
    }
    (out / "probes.json").write_text(json.dumps(summary, indent=2))
    files.append(out / "probes.json")
    fig, ax = plt.subplots(figsize=(5, 3))
    x = np.arange(len(res.stages))
    for j, sub in enumerate(res.subjects):
        ax.plot(x, [sub_r[s][j] for s in res.stages], marker="o", alpha=0.6, label=sub)
    ax.plot(x, [sub_r[s].mean() for s in res.stages], color="k", lw=2, marker="o", label="mean")
    ax.axhline(float(res.model_r.mean()), color="grey", ls="--", lw=1, label="model r")
    ax.set_xticks(x, res.stages)
    ax.set(ylabel="held-out probe r", title="Linear probes per stage")
    ax.legend(fontsize=7)
    files.append(finish_figure(fig, out / "probes.png", on_figure))
    return files
