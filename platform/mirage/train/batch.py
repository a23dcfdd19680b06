"""The model-facing batch and its move from host memory to the training device."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mirage.config import MODALITIES


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

    def to(self, device: torch.device, modalities: list[str] | tuple[str, ...], pin: bool = False) -> "Batch":
        """Copy to ``device``; features travel as float16 and become float32 there.

        On a CPU the cast runs in numpy (several times faster than torch's half->float on CPU).
        """
        out = {}
        if device.type == "cpu":
            for m in modalities:
                x = self.features[:, :, MODALITIES.index(m)].transpose(0, 2, 1, 3)  # (B, L, T, D) view
                out[m] = torch.from_numpy(np.ascontiguousarray(x).astype(np.float32))
        else:
            feats = torch.from_numpy(self.features)  # (B, T, 3, L, D) float16
            if pin and device.type == "cuda":
                feats = feats.pin_memory()
            feats = feats.to(device, non_blocking=True)
            for m in modalities:
                i = MODALITIES.index(m)
                out[m] = feats[:, :, i].permute(0, 2, 1, 3).float().contiguous()  # (B, L, T, D)
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
