"""Layer poolers: one vector per frame from a modality's backbone layer stack.

The MIRAGE pooler (learned queries attend over the layers) and the reference's alternatives
(``modality_stack`` kinds): all-layers mean, concatenation, self-attention over the layers.
:func:`build_layer_pooler` picks one from ``model.layer_pool``.
"""

from __future__ import annotations

from typing import get_args

import torch
from torch import Tensor, nn

from mirage.config import ConfigError, ModelConfig


class LayerCrossAttentionPooler(nn.Module):
    """Pools the layer axis of one modality's features with learned latent queries.

    For every frame, the ``n_layers`` layer vectors are layer-normalised and used as keys
    and values of a multi-head attention whose queries are ``n_queries`` learned tokens
    (shared by every frame); the query outputs are layer-normalised and concatenated.
    No parameter depends on ``n_layers``.

    Set ``record_attention = True`` to keep the last forward's attention weights in
    ``last_attention_weights`` (``(B * T, heads, n_queries, n_layers)``, batch-major rows).
    """

    def __init__(self, dim: int, n_queries: int, heads: int, dropout: float, query_init_std: float) -> None:
        super().__init__()
        self.dim = dim
        self.n_queries = n_queries
        self.query_init_std = query_init_std
        self.query_tokens = nn.Parameter(torch.empty(n_queries, dim))
        self.input_norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.output_norm = nn.LayerNorm(dim)
        self.record_attention = False
        self.last_attention_weights: Tensor | None = None
        nn.init.normal_(self.query_tokens, std=query_init_std)

    @property
    def out_dim(self) -> int:
        return self.n_queries * self.dim

    def attend(self, x: Tensor, need_weights: bool) -> tuple[Tensor, Tensor | None]:
        """Pooled features and (optionally) attention weights.

        Args:
            x: ``(B, n_layers, T, dim)`` features of one modality.
            need_weights: also return the per-head attention weights.

        Returns:
            ``(B, T, n_queries * dim)`` and ``(B, T, heads, n_queries, n_layers)`` or None.
        """
        B, L, T, D = x.shape
        x = x.to(self.query_tokens.dtype)
        tokens = x.permute(0, 2, 1, 3).reshape(B * T, L, D)  # (B*T, L, D)
        tokens = self.input_norm(tokens)
        queries = self.query_tokens.unsqueeze(0).expand(B * T, -1, -1)  # (B*T, Q, D)
        out, weights = self.attn(
            queries, tokens, tokens, need_weights=need_weights, average_attn_weights=False
        )  # (B*T, Q, D), (B*T, heads, Q, L)
        out = self.output_norm(out)  # (B*T, Q, D)
        out = out.reshape(B, T, self.n_queries * D)  # (B, T, Q*D), query-major
        if weights is not None:
            weights = weights.reshape(B, T, *weights.shape[1:])  # (B, T, heads, Q, L)
        return out, weights

    def forward(self, x: Tensor) -> Tensor:
        """``(B, n_layers, T, dim)`` -> ``(B, T, n_queries * dim)``."""
        out, weights = self.attend(x, need_weights=self.record_attention)
        self.last_attention_weights = None if weights is None else weights.detach().flatten(0, 1)
        return out


class LayerMeanPooler(nn.Module):
    """All-layers mean: ``(B, n_layers, T, dim)`` -> ``(B, T, dim)``. No parameters."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    @property
    def out_dim(self) -> int:
        return self.dim

    def forward(self, x: Tensor) -> Tensor:
        """``(B, n_layers, T, dim)`` -> ``(B, T, dim)``."""
        return x.mean(dim=1)


class LayerConcatPooler(nn.Module):
    """The layers side by side: ``(B, n_layers, T, dim)`` -> ``(B, T, n_layers * dim)``, layer-major.

    The only pooler whose output width depends on ``n_layers``, fixed when it is built.
    """

    def __init__(self, dim: int, n_layers: int) -> None:
        super().__init__()
        if n_layers < 1:
            raise ConfigError(
                f"model.layer_pool='concat' needs the number of layers fed to the model, got {n_layers}"
            )
        self.dim, self.n_layers = dim, n_layers

    @property
    def out_dim(self) -> int:
        return self.n_layers * self.dim

    def forward(self, x: Tensor) -> Tensor:
        """``(B, n_layers, T, dim)`` -> ``(B, T, n_layers * dim)``."""
        B, L, T, D = x.shape
        if L != self.n_layers:
            raise ValueError(f"layer_pool='concat': built for {self.n_layers} layers, got features with {L}")
        return x.permute(0, 2, 1, 3).reshape(B, T, L * D)


class LayerSelfAttentionPooler(nn.Module):
    """One pre-norm transformer layer over the layer tokens of each frame; the deepest outputs are kept.

    The ``n_layers`` vectors of a frame are layer-normalised into tokens; the deepest ``n_tokens``
    of them attend (multi-head, pre-norm, residual) over all tokens and pass a residual GELU
    feed-forward block; the results are layer-normalised and concatenated. Only the kept tokens'
    outputs are computed. No parameter depends on ``n_layers``.
    """

    def __init__(self, dim: int, n_tokens: int, heads: int, dropout: float, ff_mult: int) -> None:
        super().__init__()
        self.dim, self.n_tokens = dim, n_tokens
        self.input_norm = nn.LayerNorm(dim)
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ff_norm = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Linear(ff_mult * dim, dim))
        self.output_norm = nn.LayerNorm(dim)

    @property
    def out_dim(self) -> int:
        return self.n_tokens * self.dim

    def forward(self, x: Tensor) -> Tensor:
        """``(B, n_layers, T, dim)`` -> ``(B, T, n_tokens * dim)``."""
        B, L, T, D = x.shape
        if L < self.n_tokens:
            raise ValueError(
                f"layer_pool='self_attention': model.self_attention_tokens={self.n_tokens} exceeds the {L} layers fed"
            )
        x = x.to(self.output_norm.weight.dtype)
        tokens = self.input_norm(x.permute(0, 2, 1, 3).reshape(B * T, L, D))  # (B*T, L, D)
        normed = self.attn_norm(tokens)
        kept = tokens[:, L - self.n_tokens :]  # (B*T, K, D)
        attended, _ = self.attn(normed[:, L - self.n_tokens :], normed, normed, need_weights=False)
        h = kept + attended
        h = h + self.ff(self.ff_norm(h))
        return self.output_norm(h).reshape(B, T, self.n_tokens * D)  # (B, T, K*D), token-major


LAYER_POOLS: tuple[str, ...] = get_args(ModelConfig.model_fields["layer_pool"].annotation)
"""The values of ``model.layer_pool`` (from the config's field)."""


def build_layer_pooler(cfg: ModelConfig, dim: int, n_layers: int) -> nn.Module:
    """The layer pooler ``cfg.layer_pool`` names for one modality of feature width ``dim``.

    Every pooler maps ``(B, n_layers, T, dim)`` to ``(B, T, out_dim)``.
    """
    kind = cfg.layer_pool
    if kind == "cross_attention":
        return LayerCrossAttentionPooler(dim, cfg.n_queries, cfg.pooler_heads, cfg.pooler_dropout, cfg.query_init_std)
    if kind == "mean":
        return LayerMeanPooler(dim)
    if kind == "concat":
        return LayerConcatPooler(dim, n_layers)
    if kind == "self_attention":
        return LayerSelfAttentionPooler(
            dim, cfg.self_attention_tokens, cfg.pooler_heads, cfg.pooler_dropout, cfg.self_attention_ff_mult
        )
    raise ConfigError(f"model.layer_pool={kind!r}: expected one of {list(LAYER_POOLS)}")
