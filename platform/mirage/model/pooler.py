"""Layer cross-attention pooler: learned queries attend over the backbone's layer stack."""

from __future__ import annotations

import torch
from torch import Tensor, nn


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
