"""One predictor for batch prediction, Serve and the tests.

:class:`Predictor` is built from a model directory and predicts whole runs:

- an exported model (``model.safetensors`` + ``config.yaml`` + ``meta.json``);
- an ensemble directory (``ensemble.json`` + ``weights.npy`` (n_members, n_subjects,
  n_parcels) + ``members/<i>/`` exported models), combined per subject and parcel;
- a published-format directory (``model.safetensors`` + the reference trainer's
  ``config.yaml``), loaded through the reference key map.

A run's features ``(n_frames, 3, n_layers, dim)`` (store layout: vision, audio, text) are cut
into the non-overlapping windows of :func:`mirage.data.windows.windows_for_prediction`, the
windows of one or many runs go through the model in batches, and the window outputs are
stitched back so that every TR is predicted exactly once.

No Ray here; MLflow is imported only by :meth:`Predictor.from_uri` for ``models:/`` and
``runs:/`` URIs.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mirage.config import MODALITIES, Config
from mirage.errors import DataError, ModelLoadError

ENSEMBLE_FILE = "ensemble.json"
WEIGHTS_FILE = "weights.npy"
EXPORT_FILES = ("model.safetensors", "config.yaml", "meta.json")
PUBLISHED_FILES = ("model.safetensors", "config.yaml")


@dataclass
class Member:
    """One model of a predictor and the store layers it reads (None = all)."""

    model: torch.nn.Module
    layers: list[int] | None
    dim: int
    n_layers: int = 0
    """Layers of the store arrays it was trained on when ``layers`` is None (0 = unknown)."""


@dataclass(frozen=True)
class RunRequest:
    """One run to predict: features (n_frames, 3, n_layers, dim), subject id, n_trs."""

    features: np.ndarray
    subject: str
    n_trs: int


def model_kind(path: str | os.PathLike) -> str:
    """``"ensemble"``, ``"exported"`` or ``"published"`` for a model directory.

    Raises:
        ModelLoadError: the directory holds none of the three layouts.
    """
    p = Path(path)
    if not p.is_dir():
        raise ModelLoadError(f"{p}: model directory not found")
    if (p / ENSEMBLE_FILE).is_file():
        return "ensemble"
    if all((p / f).is_file() for f in EXPORT_FILES):
        return "exported"
    if all((p / f).is_file() for f in PUBLISHED_FILES):
        return "published"
    raise ModelLoadError(
        f"{p}: not a model directory; expected {ENSEMBLE_FILE} (ensemble), {'+'.join(EXPORT_FILES)} "
        f"(exported model) or {'+'.join(PUBLISHED_FILES)} (published MIRAGE weights)"
    )


def find_model_dir(root: str | os.PathLike) -> Path:
    """The shallowest model directory under ``root`` (ensembles first), e.g. inside a downloaded MLflow model."""
    root = Path(root)
    candidates: list[tuple[int, int, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        names = set(filenames)
        rank = 0 if ENSEMBLE_FILE in names else 1 if set(EXPORT_FILES) <= names else 2 if set(PUBLISHED_FILES) <= names else None
        if rank is not None:
            candidates.append((rank, len(Path(dirpath).relative_to(root).parts), Path(dirpath)))
    if not candidates:
        raise ModelLoadError(f"{root}: no exported model, ensemble or published MIRAGE weights found inside")
    return min(candidates)[2]


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Predictor:
    """Predicts whole fMRI runs with one model or a per-parcel weighted ensemble.

    Args:
        members: the models, all with the same subjects, parcels and window length.
        cfg: config whose ``data`` (window_trs, tr, hrf_delay_trs) and ``features.rate_hz``
            define the windows (the first member's training config).
        subjects: subject ids in head order.
        weights: (n_members, n_subjects, n_parcels) ensemble weights, or None for one member.
        feature_key: feature store key the models were trained on (None = unknown).
        window_batch: windows per forward pass.
        device: torch device (default: cuda when available).
    """

    def __init__(
        self,
        members: list[Member],
        cfg: Config,
        subjects: Sequence[str],
        weights: np.ndarray | None = None,
        feature_key: str | None = None,
        source: str = "",
        window_batch: int = 16,
        device: str | torch.device | None = None,
    ) -> None:
        if not members:
            raise ModelLoadError("a predictor needs at least one model")
        self.device = _device(device)
        self.members = members
        for m in members:
            m.model.to(self.device).eval()
        first = members[0].model
        self.cfg = cfg
        self.subjects = list(subjects)
        self.n_parcels = int(first.n_parcels)
        self.window_trs = int(first.n_output_trs)
        self.feature_key = feature_key
        self.source = source
        self.window_batch = max(int(window_batch), 1)
        self.modalities = list(first.modalities)
        for i, m in enumerate(members):
            sizes = (m.model.n_parcels, m.model.n_subjects, m.model.n_output_trs)
            if sizes != (self.n_parcels, len(self.subjects), self.window_trs):
                raise ModelLoadError(
                    f"{source}: member {i} has (n_parcels, n_subjects, n_output_trs) = {sizes}, expected "
                    f"{(self.n_parcels, len(self.subjects), self.window_trs)}"
                )
        if self.window_trs != cfg.data.window_trs:
            raise ModelLoadError(
                f"{source}: the model outputs {self.window_trs} TRs per window but data.window_trs={cfg.data.window_trs}"
            )
        if weights is not None:
            weights = np.asarray(weights, dtype=np.float64)
            want = (len(members), len(self.subjects), self.n_parcels)
            if weights.shape != want:
                raise ModelLoadError(f"{source}: {WEIGHTS_FILE} has shape {weights.shape}, expected {want}")
            if not np.isfinite(weights).all():
                raise ModelLoadError(f"{source}: {WEIGHTS_FILE} holds non-finite values")
        elif len(members) > 1:
            raise ModelLoadError(f"{source}: {len(members)} members need ensemble weights")
        self.weights = weights

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_path(cls, path: str | os.PathLike, device: str | torch.device | None = None, window_batch: int = 16) -> "Predictor":
        """Load an exported model, an ensemble directory or a published-format directory."""
        path = Path(path)
        kind = model_kind(path)
        kw = {"device": device, "window_batch": window_batch, "source": str(path)}
        if kind == "exported":
            member, cfg, meta = _load_exported_member(path)
            return cls([member], cfg, meta.get("subjects") or cfg.data.subjects, feature_key=meta.get("feature_key"), **kw)
        if kind == "published":
            from mirage.config import load_config
            from mirage.model import load_reference

            model = load_reference(path / "model.safetensors", path / "config.yaml")
            subjects = _reference_subjects(path / "config.yaml", model.n_subjects)
            cfg = load_config("paper", {"data.window_trs": model.n_output_trs, "data.subjects": subjects})
            dim = next(iter(model.feature_dims.values()))[1]
            return cls([Member(model, None, dim)], cfg, subjects, **kw)
        return cls._from_ensemble(path, **kw)

    @classmethod
    def _from_ensemble(cls, path: Path, **kw: Any) -> "Predictor":
        try:
            info = json.loads((path / ENSEMBLE_FILE).read_text())
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{path / ENSEMBLE_FILE}: not valid JSON ({e})") from None
        names = info.get("members")
        if not isinstance(names, list) or not names:
            raise ModelLoadError(f"{path / ENSEMBLE_FILE}: 'members' must list the member directories")
        if not (path / WEIGHTS_FILE).is_file():
            raise ModelLoadError(f"{path}: {WEIGHTS_FILE} missing")
        weights = np.load(path / WEIGHTS_FILE, allow_pickle=False)
        members, cfgs, metas = [], [], []
        for name in names:
            member_dir = (path / name).resolve()
            if path.resolve() not in member_dir.parents:
                raise ModelLoadError(f"{path / ENSEMBLE_FILE}: member {name!r} points outside the ensemble directory")
            m, c, meta = _load_exported_member(member_dir)
            members.append(m), cfgs.append(c), metas.append(meta)
        subjects = info.get("subjects") or metas[0].get("subjects") or cfgs[0].data.subjects
        for i, c in enumerate(cfgs[1:], 1):
            a, b = cfgs[0], c
            if (a.data.tr, a.data.hrf_delay_trs, a.features.rate_hz) != (b.data.tr, b.data.hrf_delay_trs, b.features.rate_hz):
                raise ModelLoadError(f"{path}: member {i} was trained with other window settings than member 0")
        keys = {meta.get("feature_key") for meta in metas}
        if len(keys) > 1:
            raise ModelLoadError(f"{path}: members were trained on different feature stores {sorted(map(str, keys))}")
        return cls(members, cfgs[0], subjects, weights=weights, feature_key=keys.pop(), **kw)

    @classmethod
    def from_uri(
        cls,
        uri: str,
        tracking_uri: str | None = None,
        device: str | torch.device | None = None,
        window_batch: int = 16,
        cache_dir: str | os.PathLike | None = None,
    ) -> "Predictor":
        """Load from a local path, ``file://`` URI, ``models:/<name>@<alias>`` or ``runs:/<id>/<path>``.

        MLflow URIs are downloaded (to ``cache_dir``, or a temporary folder removed once the
        weights are in memory) and the model directory is looked up inside the download (e.g.
        the pyfunc model's ``predictor`` artifact).
        """
        if uri.startswith("file://"):
            uri = uri[len("file://"):]
        if not uri.startswith(("models:/", "runs:/")):
            return cls.from_path(uri, device=device, window_batch=window_batch)
        if cache_dir is None:  # weights are read into memory: the download can go right after
            with tempfile.TemporaryDirectory(prefix="mirage-model-") as tmp:
                return cls.from_uri(uri, tracking_uri, device, window_batch, cache_dir=tmp)
        dst = Path(cache_dir)
        dst.mkdir(parents=True, exist_ok=True)
        local = _download(uri, tracking_uri, dst)
        p = cls.from_path(find_model_dir(local), device=device, window_batch=window_batch)
        p.source = uri
        return p

    # -------------------------------------------------------------- properties

    @property
    def rate_hz(self) -> float:
        """Feature frames per second the models were trained on."""
        return float(self.cfg.features.rate_hz)

    @property
    def dim(self) -> int:
        return self.members[0].dim

    @property
    def min_layers(self) -> int:
        """Layers a feature array needs (one past the largest selected index; 1 when all are used)."""
        need = [max(i + 1 if i >= 0 else -i for i in m.layers) for m in self.members if m.layers]
        return max(need, default=1)

    def subject_index(self, subject: str) -> int:
        if subject not in self.subjects:
            raise DataError(f"unknown subject {subject!r}; expected one of {self.subjects}")
        return self.subjects.index(subject)

    def default_n_trs(self, n_frames: int) -> int:
        """TRs spanned by ``n_frames`` feature frames (when no fMRI length is known)."""
        return max(int(round(n_frames / self.rate_hz / self.cfg.data.tr)), 1)

    def check_run(self, features: np.ndarray, subject: str, n_trs: int) -> None:
        """Validate one request; raises DataError naming the field and what was expected."""
        self.subject_index(subject)
        if not isinstance(features, np.ndarray) or features.dtype.kind != "f":
            got = getattr(features, "dtype", type(features).__name__)
            raise DataError(f"features: expected a float16/float32 array, got {got}")
        shape = features.shape
        if features.ndim != 4 or shape[1] != len(MODALITIES) or shape[3] != self.dim or shape[0] < 1:
            raise DataError(
                f"features: shape {shape}, expected (n_frames >= 1, {len(MODALITIES)}, n_layers >= {self.min_layers}, {self.dim})"
            )
        if shape[2] < self.min_layers:
            raise DataError(f"features: {shape[2]} layers, the model reads layers up to index {self.min_layers - 1}")
        for m in self.members:
            if m.layers is None and m.n_layers and shape[2] != m.n_layers:
                raise DataError(f"features: {shape[2]} layers, the model was trained on all {m.n_layers} store layers")
        if isinstance(n_trs, bool) or not isinstance(n_trs, (int, np.integer)) or n_trs < 1:
            raise DataError(f"n_trs: expected an integer >= 1, got {n_trs!r}")
        if not np.isfinite(features).all():
            raise DataError("features: contain NaN or inf")

    # ---------------------------------------------------------------- predict

    def predict_run(self, features: np.ndarray, subject: str, n_trs: int) -> np.ndarray:
        """Predict one run.

        Args:
            features: (n_frames, 3, n_layers, dim) float16/float32, modality axis vision, audio, text.
            subject: subject id (``sub-01``).
            n_trs: TRs to predict.

        Returns:
            (n_trs, n_parcels) float32.
        """
        return self.predict_runs([RunRequest(features, subject, n_trs)])[0]

    def predict_runs(self, requests: Sequence[RunRequest]) -> list[np.ndarray]:
        """Predict several runs, their windows batched together; one (n_trs, n_parcels) array each."""
        from mirage.data.windows import windows_for_prediction

        for r in requests:
            self.check_run(r.features, r.subject, r.n_trs)
        jobs = []  # (request index, window)
        for i, r in enumerate(requests):
            for w in windows_for_prediction(int(r.n_trs), self.cfg.data, self.rate_hz, r.features.shape[0]):
                jobs.append((i, w))
        n_members = len(self.members)
        outs = [np.full((n_members, int(r.n_trs), self.n_parcels), np.nan, np.float32) for r in requests]
        for start in range(0, len(jobs), self.window_batch):
            chunk = jobs[start : start + self.window_batch]
            subject_id = torch.tensor([self.subject_index(requests[i].subject) for i, _ in chunk], device=self.device)
            for k, member in enumerate(self.members):
                x = self._window_inputs(member, [(requests[i].features, w) for i, w in chunk])
                with torch.inference_mode():
                    y = member.model(x, subject_id).float().cpu().numpy()  # (B, window_trs, P)
                for (i, w), yb in zip(chunk, y):
                    n = w.n_valid
                    outs[i][k, w.tr_start : w.tr_start + n] = yb[:n]
        results = []
        for i, (r, out) in enumerate(zip(requests, outs)):
            if np.isnan(out).any():
                raise RuntimeError(f"request {i}: windows left TRs unpredicted (window plan does not cover the run)")
            if self.weights is None:
                results.append(np.ascontiguousarray(out[0]))
            else:
                w = self.weights[:, self.subject_index(r.subject)]  # (M, P)
                results.append(np.einsum("mtp,mp->tp", out.astype(np.float64), w).astype(np.float32))  # (T, P)
        return results

    def _window_inputs(self, member: Member, items: list[tuple[np.ndarray, Any]]) -> dict[str, torch.Tensor]:
        """Windows of store features -> modality -> (B, L, T, D) float32 on the device (zero padded)."""
        length = items[0][1].frame_stop - items[0][1].frame_start
        first = items[0][0]
        n_layers = len(member.layers) if member.layers else first.shape[2]
        batch = np.zeros((len(items), length, first.shape[1], n_layers, first.shape[3]), np.float32)  # (B, T, 3, L, D)
        for b, (feats, w) in enumerate(items):
            lo, hi = max(w.frame_start, 0), min(w.frame_stop, feats.shape[0])
            if hi > lo:
                rows = np.asarray(feats[lo:hi])  # (hi - lo, 3, L_store, D)
                if member.layers:
                    rows = rows[:, :, member.layers]
                batch[b, lo - w.frame_start : hi - w.frame_start] = rows
        x = torch.from_numpy(batch).to(self.device)
        return {m: x[:, :, MODALITIES.index(m)].permute(0, 2, 1, 3).contiguous() for m in self.modalities}  # (B, L, T, D)


def _load_exported_member(path: Path) -> tuple[Member, Config, dict[str, Any]]:
    from mirage.model import load_exported

    model, cfg, meta = load_exported(path)
    layers = meta.get("layers", cfg.model.layers)
    dims = {(int(d[0]), int(d[1])) for d in meta["feature_dims"].values()}
    if len(dims) != 1:
        raise ModelLoadError(f"{path}: modalities have different feature dims {sorted(dims)}; the store holds one")
    n_layers, dim = dims.pop()
    return Member(model, list(layers) if layers else None, dim, n_layers), cfg, meta


def _reference_subjects(config_yaml: Path, n_subjects: int) -> list[str]:
    """Subject ids of a reference run (``data.subjects`` when present, else the Algonauts four)."""
    import yaml

    from mirage.config import SUBJECTS

    tree = yaml.safe_load(config_yaml.read_text()) or {}
    data = tree.get("data") if isinstance(tree, dict) else None
    subs = data.get("subjects") if isinstance(data, dict) else None
    if isinstance(subs, list) and len(subs) == n_subjects:
        return [s if str(s).startswith("sub-") else f"sub-{int(s):02d}" for s in subs]
    if n_subjects == len(SUBJECTS):
        return list(SUBJECTS)
    return [f"sub-{i + 1:02d}" for i in range(n_subjects)]


def _download(uri: str, tracking_uri: str | None, dst: Path) -> str:
    """Download a ``models:/`` or ``runs:/`` URI into ``dst`` with a client bound to ``tracking_uri``.

    Registered models are resolved here (alias or version -> the version's artifact location), so
    that neither the global tracking URI nor the global registry URI is read or changed.
    """
    import mlflow.artifacts
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        if uri.startswith("models:/"):
            c = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
            ref, _, sub = uri[len("models:/"):].partition("/")
            if "@" in ref:
                name, alias = ref.split("@", 1)
                version = c.get_model_version_by_alias(name, alias).version
            elif sub and sub.split("/")[0].isdigit():
                name, version = ref, sub.split("/")[0]
                sub = sub.partition("/")[2]
            else:
                raise ModelLoadError(f"{uri}: expected models:/<name>@<alias> or models:/<name>/<version>")
            source = c.get_model_version_download_uri(name, version)
            if sub:
                source = source.rstrip("/") + "/" + sub
            return mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst), tracking_uri=tracking_uri)
        return mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst), tracking_uri=tracking_uri)
    except MlflowException as e:
        raise ModelLoadError(f"{uri}: cannot download from MLflow at {tracking_uri}: {e.message}") from None
