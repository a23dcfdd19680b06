"""Per-subject linear readout onto parcels."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

HEAD_INITS = ("uniform", "normal")


class SubjectLinear(nn.Module):
    """One linear map per subject: ``y[b] = x[b] @ weights[s_b] + bias_param[s_b]``.

    ``weights`` is ``(n_subjects, dim, n_parcels)`` (in, out order), ``bias_param``
    ``(n_subjects, n_parcels)``. ``init`` (``model.head_init``): ``"uniform"`` draws the
    weights from U(-dim^-1/2, dim^-1/2) with a zero bias; ``"normal"`` draws weights and
    bias from N(0, std dim^-1/2).
    """

    def __init__(self, dim: int, n_parcels: int, n_subjects: int, init: str = "uniform") -> None:
        super().__init__()
        if init not in HEAD_INITS:
            raise ValueError(f"head init {init!r}: expected one of {HEAD_INITS}")
        self.weights = nn.Parameter(torch.empty(n_subjects, dim, n_parcels))
        self.bias_param = nn.Parameter(torch.zeros(n_subjects, n_parcels))
        scale = 1.0 / math.sqrt(dim)
        if init == "uniform":
            nn.init.uniform_(self.weights, -scale, scale)
        else:
            nn.init.normal_(self.weights, std=scale)
            nn.init.normal_(self.bias_param, std=scale)

    def forward(self, x: Tensor, subject_id: Tensor) -> Tensor:
        """``x`` ``(B, T, dim)``, ``subject_id`` ``(B,)`` -> ``(B, T, n_parcels)``."""
        w = self.weights[subject_id]  # (B, dim, P)
        b = self.bias_param[subject_id].unsqueeze(1)  # (B, 1, P)
        return torch.baddbmm(b, x, w)  # (B, T, P)
