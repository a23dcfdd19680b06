"""The model-facing batch and its move from host memory to the training device."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mirage.features.model_inputs import model_inputs


@dataclass
class HostBatch:
    """A batch as the loader builds it, in host memory.

    Attributes:
        features: (B, T, 3, L, D) float16, feature-store layout (modality axis: vision, audio, text).
        subject_id: (B,) int64 subject index.
        fmri: (B, window_trs, P) float32 z-scored fMRI (0 on padded rows).
        mask: (B, window_trs) bool, True on real fMRI rows.
    """

    features: np.ndarray
    subject_id: np.ndarray
    fmri: np.ndarray
    mask: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.features.nbytes + self.fmri.nbytes + self.mask.nbytes + self.subject_id.nbytes

    def to(self, device: torch.device, modalities: list[str] | tuple[str, ...], pin: bool = False) -> Batch:
        """Copy to ``device``; features travel as float16 and become float32 there (:func:`model_inputs`)."""
        out = model_inputs(self.features, modalities, device, pin=pin)
        return Batch(
            features=out,
            subject_id=torch.from_numpy(self.subject_id).to(device),
            fmri=torch.from_numpy(self.fmri).to(device, non_blocking=True),
            mask=torch.from_numpy(self.mask).to(device),
        )


@dataclass
class Batch:
    """What the model and the steps consume.

    Attributes:
        features: modality -> (B, L, T, D) float32.
        subject_id: (B,) long.
        fmri: (B, window_trs, P) float32.
        mask: (B, window_trs) bool.
    """

    features: dict[str, torch.Tensor]
    subject_id: torch.Tensor
    fmri: torch.Tensor
    mask: torch.Tensor
