"""The one way to run a trained model outside the training step.

:class:`Predictor` holds one model or a per-parcel weighted ensemble and predicts whole runs
(:meth:`Predictor.predict_runs`). It is built from

- a model directory (:meth:`Predictor.from_path`): an exported model (``model.safetensors`` +
  ``config.yaml`` + ``meta.json``), an ensemble directory (``ensemble.json`` + ``weights.npy``
  (n_members, n_subjects, n_parcels) + ``members/<i>/`` exported models) or a published-format
  directory (``model.safetensors`` + the reference trainer's ``config.yaml``, read through the
  reference key map);
- exported member directories whose ensemble weights are not fitted yet
  (:meth:`Predictor.from_members`; then :meth:`Predictor.set_weights` and :meth:`Predictor.save`
  write the ensemble directory that is registered);
- a live model during training (:meth:`Predictor.from_model`).

A run's features ``(n_frames, 3, n_layers, dim)`` (store layout: vision, audio, text) are cut
into the non-overlapping windows of :func:`mirage.data.windows.windows_for_prediction`, the
windows of one or many runs go through the model in batches
(:func:`mirage.features.model_inputs.model_inputs`), and the window outputs are stitched back so
that every TR is predicted exactly once (:func:`predict_stored` for runs in a feature store,
keyed by :class:`mirage.data.run_key.RunKey`). Analysis, ensemble fitting, batch prediction, Serve,
submissions, ``predict-video``, the MLflow pyfunc model and the per-epoch validation predictions
all predict through it.

No Ray and no MLflow here: :func:`mirage.tracking.models.load_predictor` downloads ``models:/`` and
``runs:/`` URIs first.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from mirage.config import MODALITIES, SUBJECTS, Config, load_config
from mirage.data.run_key import RunKey
from mirage.data.windows import windows_for_prediction
from mirage.documents import read_mapping
from mirage.ensemble import combine, write_ensemble_dir
from mirage.errors import DataError, FeatureStoreError, MirageError, ModelLoadError
from mirage.features.model_inputs import model_inputs, window_rows
from mirage.features.store import FeatureStore, open_store
from mirage.model import load_exported, load_reference
from mirage.model_dirs import ENSEMBLE_FILE, WEIGHTS_FILE, model_kind


@dataclass
class LoadedModel:
    """One model of a predictor, the store layers it reads (None = all) and where it was loaded from."""

    model: torch.nn.Module
    layers: list[int] | None
    dim: int
    n_layers: int = 0
    """Layers of the store arrays it was trained on when ``layers`` is None (0 = unknown)."""
    directory: Path | None = None
    """The exported model directory it was loaded from (None: a live or published model)."""


@dataclass(frozen=True)
class RunRequest:
    """One run to predict: features (n_frames, 3, n_layers, dim), subject id, n_trs."""

    features: np.ndarray
    subject: str
    n_trs: int


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
        weights: (n_members, n_subjects, n_parcels) ensemble weights; None for one member, or
            for members whose weights are not fitted yet (they predict with ``per_member`` only).
        feature_key: feature store key the models were trained on (None = unknown).
        window_batch: windows per forward pass.
        device: torch device (default: cuda when available).
        live: the models are being trained: they stay where they are (a sharded model keeps its
            shards) and predict under ``no_grad`` instead of ``inference_mode``.
    """

    def __init__(
        self,
        members: list[LoadedModel],
        cfg: Config,
        subjects: Sequence[str],
        weights: np.ndarray | None = None,
        feature_key: str | None = None,
        source: str = "",
        window_batch: int = 16,
        device: str | torch.device | None = None,
        live: bool = False,
    ) -> None:
        if not members:
            raise ModelLoadError("a predictor needs at least one model")
        self.device = _device(device)
        self.members = members
        self.live = live
        for m in members:
            if not live:
                m.model.to(self.device)
            m.model.eval()
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
        self.weights: np.ndarray | None = None
        if weights is not None:
            self.set_weights(weights)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_path(cls, path: str | os.PathLike, device: str | torch.device | None = None, window_batch: int = 16) -> Predictor:
        """Load an exported model, an ensemble directory or a published-format directory."""
        path = Path(path)
        kind = model_kind(path)
        kw = {"device": device, "window_batch": window_batch, "source": str(path)}
        if kind == "exported":
            return cls.from_members([path], **kw)
        if kind == "published":
            model = load_reference(path / "model.safetensors", path / "config.yaml")
            subjects = _reference_subjects(path / "config.yaml", model.n_subjects)
            cfg = load_config("paper", {"data.window_trs": model.n_output_trs, "data.subjects": subjects})
            dim = next(iter(model.feature_dims.values()))[1]
            return cls([LoadedModel(model, None, dim)], cfg, subjects, **kw)
        return cls._from_ensemble(path, **kw)

    @classmethod
    def _from_ensemble(cls, path: Path, **kw: Any) -> Predictor:
        info = read_mapping(path / ENSEMBLE_FILE, ModelLoadError)
        names = info.get("members")
        if not isinstance(names, list) or not names:
            raise ModelLoadError(f"{path / ENSEMBLE_FILE}: 'members' must list the member directories")
        if not (path / WEIGHTS_FILE).is_file():
            raise ModelLoadError(f"{path}: {WEIGHTS_FILE} missing")
        weights = np.load(path / WEIGHTS_FILE, allow_pickle=False)
        dirs = []
        for name in names:
            member_dir = (path / name).resolve()
            if path.resolve() not in member_dir.parents:
                raise ModelLoadError(f"{path / ENSEMBLE_FILE}: member {name!r} points outside the ensemble directory")
            dirs.append(member_dir)
        return cls.from_members(dirs, weights=weights, subjects=info.get("subjects"), **kw)

    @classmethod
    def from_members(
        cls,
        member_dirs: Sequence[str | os.PathLike],
        weights: np.ndarray | None = None,
        subjects: Sequence[str] | None = None,
        source: str = "",
        window_batch: int = 16,
        device: str | torch.device | None = None,
    ) -> Predictor:
        """Exported models as one predictor: a single model, or ensemble members (weights fitted or not yet).

        Raises:
            ModelLoadError: the members differ in window settings or feature store.
        """
        if not member_dirs:
            raise ModelLoadError("a predictor needs at least one exported model directory")
        members, cfgs, metas = [], [], []
        for d in member_dirs:
            m, c, meta = _load_exported_member(Path(d))
            members.append(m), cfgs.append(c), metas.append(meta)
        source = source or str(member_dirs[0])
        for i, c in enumerate(cfgs[1:], 1):
            a, b = cfgs[0], c
            if (a.data.tr, a.data.hrf_delay_trs, a.features.rate_hz) != (b.data.tr, b.data.hrf_delay_trs, b.features.rate_hz):
                raise ModelLoadError(f"{source}: member {i} was trained with other window settings than member 0")
        keys = {meta.get("feature_key") for meta in metas}
        if len(keys) > 1:
            raise ModelLoadError(f"{source}: members were trained on different feature stores {sorted(map(str, keys))}")
        subjects = subjects or metas[0].get("subjects") or cfgs[0].data.subjects
        return cls(members, cfgs[0], subjects, weights=weights, feature_key=keys.pop(), source=source,
                   window_batch=window_batch, device=device)

    @classmethod
    def from_model(
        cls,
        model: torch.nn.Module,
        cfg: Config,
        layers: Sequence[int] | None,
        device: str | torch.device,
        n_layers: int = 0,
        window_batch: int = 16,
    ) -> Predictor:
        """A live model (e.g. during training, possibly sharded): predicts where it lives, under ``no_grad``.

        Every rank of a sharded model must make the same calls: the forward passes gather parameters.

        Args:
            model: the model; ``cfg.data.subjects`` name its heads.
            layers: store layer indices it reads (None = all ``n_layers``).
            device: where the model and its inputs live.
        """
        dim = next(iter(model.feature_dims.values()))[1]
        member = LoadedModel(model, list(layers) if layers is not None else None, int(dim), int(n_layers))
        return cls([member], cfg, cfg.data.subjects, window_batch=window_batch, device=device, live=True,
                   source="live model")

    def member(self, i: int) -> Predictor:
        """Member ``i`` alone, as a predictor sharing its loaded model."""
        return Predictor([self.members[i]], self.cfg, self.subjects, feature_key=self.feature_key,
                         source=f"{self.source} member {i}", window_batch=self.window_batch, device=self.device,
                         live=self.live)

    def set_weights(self, weights: np.ndarray) -> None:
        """Set the ensemble weights, (n_members, n_subjects, n_parcels).

        Raises:
            ModelLoadError: wrong shape or non-finite values.
        """
        weights = np.asarray(weights, dtype=np.float64)
        want = (len(self.members), len(self.subjects), self.n_parcels)
        if weights.shape != want:
            raise ModelLoadError(f"{self.source}: {WEIGHTS_FILE} has shape {weights.shape}, expected {want}")
        if not np.isfinite(weights).all():
            raise ModelLoadError(f"{self.source}: {WEIGHTS_FILE} holds non-finite values")
        self.weights = weights

    def save(self, out: str | os.PathLike, info: dict[str, Any]) -> Path:
        """Write this ensemble as a directory :meth:`from_path` reads (:func:`mirage.ensemble.write_ensemble_dir`).

        The members' exported directories are copied in; ``info`` joins ``ensemble.json``.

        Raises:
            MirageError: no weights set, or a member not loaded from an exported directory.
        """
        if self.weights is None:
            raise MirageError(f"{self.source}: set the ensemble weights before saving the ensemble")
        dirs = [m.directory for m in self.members]
        if any(d is None for d in dirs):
            raise MirageError(f"{self.source}: only members loaded from exported model directories can be saved")
        return write_ensemble_dir(out, dirs, self.weights.astype(np.float32), self.subjects, info)

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
        """Validate one request; raises DataError naming the field and what was expected.

        Arrays read from a feature store (memory maps) were checked for NaN and inf when written
        and are not scanned again.
        """
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
        if not isinstance(features, np.memmap) and not np.isfinite(features).all():
            raise DataError("features: contain NaN or inf")

    # ---------------------------------------------------------------- predict

    def predict_run(self, features: np.ndarray, subject: str, n_trs: int, drop: Sequence[str] = ()) -> np.ndarray:
        """Predict one run: features (n_frames, 3, n_layers, dim) -> (n_trs, n_parcels) float32."""
        return self.predict_runs([RunRequest(features, subject, n_trs)], drop=drop)[0]

    def predict_runs(
        self, runs: Sequence[RunRequest], drop: Sequence[str] = (), per_member: bool = False
    ) -> list[np.ndarray]:
        """Predict several runs, their windows batched together.

        Args:
            runs: the runs; features (n_frames, 3, n_layers, dim) float16/float32, modality axis
                vision, audio, text.
            drop: modalities zeroed in every member (modality ablation).
            per_member: return every member's predictions instead of the weighted ensemble.

        Returns:
            one array per run: (n_trs, n_parcels) float32, or (n_members, n_trs, n_parcels) with ``per_member``.

        Raises:
            DataError: a run's features, subject or n_trs are not usable.
            MirageError: several members without weights and not ``per_member``.
        """
        if not per_member and self.weights is None and len(self.members) > 1:
            raise MirageError(f"{self.source}: {len(self.members)} members without ensemble weights predict per member only")
        for r in runs:
            self.check_run(r.features, r.subject, r.n_trs)
        jobs = []  # (run index, window)
        for i, r in enumerate(runs):
            for w in windows_for_prediction(int(r.n_trs), self.cfg.data, self.rate_hz, r.features.shape[0]):
                jobs.append((i, w))
        outs = [np.full((len(self.members), int(r.n_trs), self.n_parcels), np.nan, np.float32) for r in runs]
        grad_mode = torch.no_grad if self.live else torch.inference_mode
        for start in range(0, len(jobs), self.window_batch):
            chunk = jobs[start : start + self.window_batch]
            subject_id = torch.tensor([self.subject_index(runs[i].subject) for i, _ in chunk], device=self.device)
            for k, member in enumerate(self.members):
                rows = np.stack([window_rows(runs[i].features, w.frame_start, w.frame_stop, member.layers) for i, w in chunk])
                x = model_inputs(rows, self.modalities, self.device)  # modality -> (B, L, T, D)
                with grad_mode():
                    member.model.eval()
                    y = member.model(x, subject_id, drop=tuple(drop)) if drop else member.model(x, subject_id)
                y = y.float().cpu().numpy()  # (B, window_trs, P)
                for (i, w), yb in zip(chunk, y):
                    outs[i][k, w.tr_start : w.tr_start + w.n_valid] = yb[: w.n_valid]
        results = []
        for i, (r, out) in enumerate(zip(runs, outs)):
            if np.isnan(out).any():
                raise RuntimeError(f"run {i}: windows left TRs unpredicted (window plan does not cover the run)")
            if per_member:
                results.append(out)
            elif self.weights is None:
                results.append(np.ascontiguousarray(out[0]))
            else:
                results.append(combine(out, self.weights[:, self.subject_index(r.subject)]))  # (T, P)
        return results

    def layer_attention(self, runs: Sequence[RunRequest], member: int = 0) -> dict[str, list[np.ndarray]]:
        """Layer attention of one member on every prediction window: modality -> [(B, T, heads, Q, L), ...]."""
        for r in runs:
            self.check_run(r.features, r.subject, r.n_trs)
        m = self.members[member]
        windows = [(r, w) for r in runs
                   for w in windows_for_prediction(int(r.n_trs), self.cfg.data, self.rate_hz, r.features.shape[0])]
        out: dict[str, list[np.ndarray]] = {}
        grad_mode = torch.no_grad if self.live else torch.inference_mode
        for start in range(0, len(windows), self.window_batch):
            chunk = windows[start : start + self.window_batch]
            rows = np.stack([window_rows(r.features, w.frame_start, w.frame_stop, m.layers) for r, w in chunk])
            with grad_mode():
                m.model.eval()
                attn = m.model.layer_attention(model_inputs(rows, self.modalities, self.device))
            for mod, a in attn.items():
                out.setdefault(mod, []).append(a.float().cpu().numpy())
        return out


def stored_runs(store: FeatureStore, runs: Mapping[RunKey, int]) -> list[RunRequest]:
    """Requests for runs whose features are in ``store``: RunKey -> n_trs, in the mapping's order.

    Raises:
        FeatureStoreError: a stimulus is not in the store.
    """
    out = []
    for key, n_trs in runs.items():
        if not store.has(key.stimulus):
            raise FeatureStoreError(f"feature store {store.key}: no features for {key.stimulus!r}; run `mirage extract`")
        out.append(RunRequest(store.read(key.stimulus), key.subject, int(n_trs)))
    return out


def predict_stored(
    predictor: Predictor, store: FeatureStore, runs: Mapping[RunKey, int], drop: Sequence[str] = (),
    per_member: bool = False,
) -> dict[RunKey, np.ndarray]:
    """:meth:`Predictor.predict_runs` on stored runs: RunKey -> n_trs in, RunKey -> predictions out."""
    return dict(zip(runs, predictor.predict_runs(stored_runs(store, runs), drop=drop, per_member=per_member)))


def open_model_store(predictor: Predictor, store_root: str) -> FeatureStore | None:
    """The feature store the model was trained on, under ``store_root`` (None when absent).

    Raises:
        FeatureStoreError: the store there holds other features than the model was trained on.
    """
    features = predictor.cfg.with_overrides({"features.store": store_root}).features
    store = open_store(features, must_exist=False)
    if store is not None and predictor.feature_key and store.key != predictor.feature_key:
        raise FeatureStoreError(
            f"feature store {store_root}: key {store.key} differs from the model's training features {predictor.feature_key}"
        )
    return store


def _load_exported_member(path: Path) -> tuple[LoadedModel, Config, dict[str, Any]]:
    model, cfg, meta = load_exported(path)
    layers = meta.get("layers", cfg.model.layers)
    dims = {(int(d[0]), int(d[1])) for d in meta["feature_dims"].values()}
    if len(dims) != 1:
        raise ModelLoadError(f"{path}: modalities have different feature dims {sorted(dims)}; the store holds one")
    n_layers, dim = dims.pop()
    return LoadedModel(model, list(layers) if layers else None, dim, n_layers, directory=path), cfg, meta


def _reference_subjects(config_yaml: Path, n_subjects: int) -> list[str]:
    """Subject ids of a reference run (``data.subjects`` when present, else the Algonauts four)."""
    tree = yaml.safe_load(config_yaml.read_text()) or {}
    data = tree.get("data") if isinstance(tree, dict) else None
    subs = data.get("subjects") if isinstance(data, dict) else None
    if isinstance(subs, list) and len(subs) == n_subjects:
        return [s if str(s).startswith("sub-") else f"sub-{int(s):02d}" for s in subs]
    if n_subjects == len(SUBJECTS):
        return list(SUBJECTS)
    return [f"sub-{i + 1:02d}" for i in range(n_subjects)]
