"""The MIRAGE model: layer poolers -> projections -> fusion -> brain encoder -> subject heads."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mirage.config import FUSION_ORDER, ConfigError, ModelConfig
from mirage.errors import MirageError
from mirage.model.encoder import BrainEncoder, EncoderBlock
from mirage.model.head import SubjectLinear
from mirage.model.pooler import build_layer_pooler


def select_layers(features, layers: Sequence[int] | None, axis: int = 1):
    """Keep the backbone layers ``cfg.model.layers`` along ``axis`` (None keeps all).

    The model itself sees whatever layer stack it is given (no parameter depends on the
    number of layers), so selection happens on the input side: the training loader and the
    predictor apply it to the stored ``(n_frames, 3, n_layers, dim)`` arrays (``axis=2``) or
    to model inputs ``(B, n_layers, T, dim)`` (``axis=1``). Works on tensors and arrays.
    """
    if layers is None:
        return features
    n = features.shape[axis]
    bad = [i for i in layers if not -n <= i < n]
    if bad:
        raise ConfigError(f"model.layers: indices {bad} out of range for a stack of {n} layers")
    if isinstance(features, Tensor):
        return features.index_select(axis, torch.as_tensor(list(layers), device=features.device) % n)
    return np.take(features, np.asarray(layers) % n, axis=axis)


class MirageModel(nn.Module):
    """Predicts parcel time courses from per-modality layer-stack features.

    Args:
        cfg: architecture (``cfg.model``).
        feature_dims: modality -> ``(n_layers, dim)`` of its features; ``n_layers`` is
            informative only (0 = unknown).
        n_parcels, n_subjects: readout size.
        n_output_trs: time steps after adaptive average pooling.

    Modalities are fused in ``mirage.config.FUSION_ORDER`` (text, audio, vision), keeping those of
    ``cfg.modalities``.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        feature_dims: Mapping[str, tuple[int, int]],
        n_parcels: int,
        n_subjects: int,
        n_output_trs: int,
    ) -> None:
        super().__init__()
        unknown = [m for m in cfg.modalities if m not in FUSION_ORDER]
        if unknown:
            raise ConfigError(f"model.modalities: unknown modalities {unknown}; expected a subset of {list(FUSION_ORDER)}")
        missing = [m for m in cfg.modalities if m not in feature_dims]
        if missing:
            raise ConfigError(f"model.modalities: no feature dims for {missing} (have {sorted(feature_dims)})")
        self.modalities = [m for m in FUSION_ORDER if m in cfg.modalities]  # fusion order
        self.feature_dims = {m: (int(feature_dims[m][0]), int(feature_dims[m][1])) for m in self.modalities}
        self.n_parcels, self.n_subjects, self.n_output_trs = n_parcels, n_subjects, n_output_trs
        self.modality_dropout = cfg.modality_dropout
        self.modality_dropout_per = cfg.modality_dropout_per
        self.dropout_generator: torch.Generator | None = None
        proj_dim = cfg.hidden_dim // len(self.modalities)
        self.dim = proj_dim * len(self.modalities)
        if self.dim % cfg.heads:
            raise ConfigError(f"model.heads={cfg.heads} must divide the fused width {self.dim} (model.hidden_dim)")
        for m in self.modalities:
            if cfg.layer_pool in ("cross_attention", "self_attention") and self.feature_dims[m][1] % cfg.pooler_heads:
                raise ConfigError(
                    f"model.pooler_heads={cfg.pooler_heads} must divide the {m} feature dim {self.feature_dims[m][1]}"
                )

        self.layer_pool = cfg.layer_pool
        self.layer_poolers = nn.ModuleDict(
            {m: build_layer_pooler(cfg, self.feature_dims[m][1], self.feature_dims[m][0]) for m in self.modalities}
        )
        self.projectors = nn.ModuleDict(
            {m: nn.Linear(self.layer_poolers[m].out_dim, proj_dim) for m in self.modalities}
        )
        self.temporal_encoder = BrainEncoder(
            self.dim,
            cfg.depth,
            cfg.heads,
            cfg.ff_mult,
            cfg.attn_dropout,
            cfg.ff_dropout,
            cfg.max_time_len,
            cfg.time_init_std,
            cfg.rotary_base,
        )
        self.head = SubjectLinear(self.dim, n_parcels, n_subjects, init=cfg.head_init)

    # ------------------------------------------------------------------ parts

    def encoder_blocks(self) -> list[EncoderBlock]:
        """The brain encoder's blocks, the units that FSDP2 shards one by one."""
        return list(self.temporal_encoder.blocks)

    def _check(self, features: Mapping[str, Tensor], drop: Iterable[str]) -> tuple[list[str], int, int]:
        drop = set(drop)
        unknown = drop - set(self.modalities)
        if unknown:
            raise ValueError(f"drop: unknown modalities {sorted(unknown)} (model has {self.modalities})")
        kept = [m for m in self.modalities if m not in drop]
        if not kept:
            raise ValueError(f"drop={sorted(drop)} removes every modality")
        absent = [m for m in kept if m not in features]
        if absent:
            raise ValueError(f"features: missing modalities {absent} (expected {kept})")
        shapes = {m: tuple(features[m].shape) for m in kept}
        for m, s in shapes.items():
            if len(s) != 4 or s[3] != self.feature_dims[m][1]:
                raise ValueError(f"features[{m!r}]: expected (B, n_layers, T, {self.feature_dims[m][1]}), got {s}")
        bt = {(s[0], s[2]) for s in shapes.values()}
        if len(bt) != 1:
            raise ValueError(f"features: batch and frame counts differ between modalities: {shapes}")
        (B, T), = bt
        return kept, B, T

    def _keep_mask(self, kept: list[str], B: int, device: torch.device) -> Tensor:
        """``(B, n_modalities)`` bool training mask: random modality dropout, at least one kept.

        Drawn for each sample (``model.modality_dropout_per == "sample"``) or once for the whole
        batch (``"batch"``, on the CPU, as the reference), then the same for every row.
        """
        if self.modality_dropout_per == "batch":
            return self._batch_keep_mask(kept).to(device).expand(B, -1)  # (B, M)
        avail = torch.tensor([m in kept for m in self.modalities], device=device)
        keep = avail.expand(B, -1).clone()  # (B, M)
        if self.modality_dropout > 0:
            keep &= torch.rand(B, len(self.modalities), device=device) >= self.modality_dropout
            none = ~keep.any(dim=1, keepdim=True)  # (B, 1)
            scores = torch.rand(B, len(self.modalities), device=device).masked_fill(~avail, -1.0)
            rescue = F.one_hot(scores.argmax(dim=1), len(self.modalities)).bool()  # (B, M) one random kept
            keep |= rescue & none
        return keep

    def _batch_keep_mask(self, kept: list[str]) -> Tensor:
        """``(n_modalities,)`` bool: each available modality dropped with probability p; one kept at random if
        all were."""
        avail = torch.tensor([m in kept for m in self.modalities])  # (M,)
        if self.modality_dropout <= 0:
            return avail
        g = self.dropout_generator
        keep = avail & (torch.rand(len(self.modalities), generator=g) >= self.modality_dropout)  # (M,)
        if not keep.any():
            choices = avail.nonzero().flatten()
            pick = torch.randint(len(choices), (1,), generator=g)
            keep = F.one_hot(choices[pick], len(self.modalities)).flatten().bool()
        return keep

    def seed_modality_dropout(self, seed: int | None) -> None:
        """Draw per-batch modality dropout from a generator seeded with ``seed`` (None: torch's global one).

        Seeded alike on every rank, every rank zeroes the same modalities in its share of a global
        batch, so a sharded run drops what a single process would.
        """
        self.dropout_generator = None if seed is None else torch.Generator().manual_seed(seed)

    def fuse(
        self, features: Mapping[str, Tensor], drop: Iterable[str] = (), trace: dict[str, Tensor] | None = None
    ) -> Tensor:
        """Pool, project, drop and concatenate the modalities: -> ``(B, T, dim)``.

        Zeroed modalities (``drop``, or modality dropout in training) contribute zeros
        after their projection; dropped ones need no features.
        """
        kept, B, T = self._check(features, drop)
        device = features[kept[0]].device
        keep = self._keep_mask(kept, B, device) if self.training else None  # (B, M)
        parts: dict[str, Tensor] = {}
        for i, m in enumerate(self.modalities):
            if m not in kept:
                continue
            pooled = self.layer_poolers[m](features[m])  # (B, T, out_dim): Q*D for cross-attention
            projected = self.projectors[m](pooled)  # (B, T, dim/M)
            if trace is not None:
                trace[f"pooled_{m}"], trace[f"projected_{m}"] = pooled, projected
            if keep is not None:
                projected = projected * keep[:, i, None, None].to(projected.dtype)  # (B, T, dim/M)
            parts[m] = projected
        like = parts[kept[0]]
        return torch.cat(
            [parts[m] if m in parts else like.new_zeros(B, T, self.projectors[m].out_features) for m in self.modalities],
            dim=-1,
        )  # (B, T, dim)

    def pool_time(self, y: Tensor) -> Tensor:
        """Adaptive average pooling over time: ``(B, T, P)`` -> ``(B, n_output_trs, P)``."""
        pooled = F.adaptive_avg_pool1d(y.transpose(1, 2), self.n_output_trs)  # (B, P, n_output_trs)
        return pooled.transpose(1, 2).clone()  # a fresh tensor, not a view (FSDP2 hooks the root output)

    # ---------------------------------------------------------------- forward

    def forward(
        self,
        features: Mapping[str, Tensor],
        subject_id: Tensor,
        pool_outputs: bool = True,
        drop: Iterable[str] = (),
    ) -> Tensor:
        """Predict parcel responses.

        Args:
            features: modality -> ``(B, n_layers, T, dim)``.
            subject_id: ``(B,)`` long, index into ``cfg.data.subjects``.
            pool_outputs: pool ``T`` frames to ``n_output_trs`` (else return per frame).
            drop: modalities zeroed (modality ablation; their features may be absent).

        Returns:
            ``(B, n_output_trs, n_parcels)``, or ``(B, T, n_parcels)`` unpooled.
        """
        return self.trace(features, subject_id, pool_outputs, drop, keep=False)["prediction"]

    def trace(
        self,
        features: Mapping[str, Tensor],
        subject_id: Tensor,
        pool_outputs: bool = True,
        drop: Iterable[str] = (),
        keep: bool = True,
    ) -> dict[str, Tensor]:
        """The forward pass with its stages: ``pooled_<m>``, ``projected_<m>``, ``fused``,
        ``temporal``, ``head`` (unpooled) and ``prediction`` (when ``keep``)."""
        out: dict[str, Tensor] = {}
        stages = out if keep else None
        x = self.fuse(features, drop, stages)  # (B, T, dim)
        h = self.temporal_encoder(x)  # (B, T, dim)
        y = self.head(h, subject_id.to(h.device))  # (B, T, P)
        if keep:
            out.update(fused=x, temporal=h, head=y)
        out["prediction"] = self.pool_time(y) if pool_outputs else y
        return out

    def layer_attention(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Per-modality attention of the queries over layers: modality -> ``(B, T, heads, Q, n_layers)``.

        Call in eval mode (in training the weights include attention dropout).

        Raises:
            MirageError: the model pools layers otherwise than by cross-attention (``model.layer_pool``).
        """
        if self.layer_pool != "cross_attention":
            raise MirageError(
                f"layer attention exists only for model.layer_pool='cross_attention'; this model pools its layers "
                f"with {self.layer_pool!r}, which has no attention over layers"
            )
        out = {}
        for m in self.modalities:
            if m in features:
                _, weights = self.layer_poolers[m].attend(features[m], need_weights=True)
                out[m] = weights
        return out


def build_model(
    cfg: ModelConfig,
    feature_dims: Mapping[str, tuple[int, int]],
    n_parcels: int,
    n_subjects: int,
    n_output_trs: int,
) -> MirageModel:
    """Build the model from ``cfg.model`` and the data's sizes.

    Args:
        cfg: ``cfg.model``.
        feature_dims: modality -> ``(n_layers, dim)``, from the feature store.
        n_parcels: parcels of the fMRI.
        n_subjects: ``len(cfg.data.subjects)``.
        n_output_trs: ``cfg.data.window_trs``.
    """
    return MirageModel(cfg, feature_dims, n_parcels, n_subjects, n_output_trs)
