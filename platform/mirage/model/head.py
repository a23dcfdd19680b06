"""Per-subject linear readout onto parcels."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class SubjectLinear(nn.Module):
    """One linear map per subject: ``y[b] = x[b] @ weights[s_b] + bias_param[s_b]``.

    ``weights`` is ``(n_subjects, dim, n_parcels)`` (in, out order), ``bias_param``
    ``(n_subjects, n_parcels)``.
    """

    def __init__(self, dim: int, n_parcels: int, n_subjects: int) -> None:
        super().__init__()
        self.weights = nn.Parameter(torch.empty(n_subjects, dim, n_parcels))
        self.bias_param = nn.Parameter(torch.zeros(n_subjects, n_parcels))
        bound = 1.0 / math.sqrt(dim)
        nn.init.uniform_(self.weights, -bound, bound)

    def forward(self, x: Tensor, subject_id: Tensor) -> Tensor:
        """``x`` ``(B, T, dim)``, ``subject_id`` ``(B,)`` -> ``(B, T, n_parcels)``."""
        w = self.weights[subject_id]  # (B, dim, P)
        b = self.bias_param[subject_id].unsqueeze(1)  # (B, 1, P)
        return torch.baddbmm(b, x, w)  # (B, T, P)
