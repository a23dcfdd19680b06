"""Stored features -> model inputs: the one conversion used by training, prediction and analysis.

A feature-store array is ``(n_frames, 3, n_store_layers, dim)`` (modality axis in
``MODALITIES`` order: vision, audio, text). A model reads, per modality, ``(B, n_layers,
T, dim)`` float32 over the window's ``T`` frames and its selected layers. :func:`window_rows`
cuts one window out of a run (zero rows outside the run, selected layers, the store's dtype);
:func:`model_inputs` turns window rows into the model's tensors on a device.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mirage.config import MODALITIES


def window_rows(features: np.ndarray, start: int, stop: int, layers: Sequence[int] | None = None) -> np.ndarray:
    """Frames ``[start, stop)`` of one run, zero outside ``[0, n_frames)``, layers ``layers`` (None = all).

    One contiguous read of the rows inside the run (``features`` may be a memory map), then the
    layer selection.

    Args:
        features: (n_frames, 3, n_store_layers, dim) store array.
        start, stop: frame range; may leave the run on either side.
        layers: store layer indices.

    Returns:
        (stop - start, 3, n_layers, dim), the dtype of ``features``.
    """
    n_layers = len(layers) if layers else features.shape[2]
    out = np.zeros((stop - start, features.shape[1], n_layers, features.shape[3]), features.dtype)
    lo, hi = max(start, 0), min(stop, features.shape[0])
    if hi > lo:
        block = np.asarray(features[lo:hi])  # (hi - lo, 3, L_store, D)
        out[lo - start : hi - start] = block[:, :, list(layers)] if layers else block
    return out


def model_inputs(
    rows: np.ndarray,
    modalities: Sequence[str],
    device: str | torch.device = "cpu",
    layers: Sequence[int] | None = None,
    pin: bool = False,
) -> dict[str, torch.Tensor]:
    """Window rows -> modality -> (B, L, T, D) float32 tensor on ``device``.

    Args:
        rows: (T, 3, L_rows, D) one window or (B, T, 3, L_rows, D) a batch, float16 or float32,
            e.g. from :func:`window_rows` (zero rows stand for frames outside the run).
        modalities: the modalities the model reads (any order; the store axis is ``MODALITIES``).
        layers: indices into ``L_rows`` to keep (None: rows already hold the selected layers).
        pin: on CUDA, copy through pinned host memory (asynchronous transfer).

    Returns:
        modality -> (B, L, T, D) float32 (B = 1 for a single window), contiguous.

    On a CPU the cast runs in numpy (several times faster than torch's half -> float there);
    on an accelerator the rows travel in their own dtype and are cast on the device.
    """
    rows = np.asarray(rows)
    if rows.ndim == 4:
        rows = rows[None]
    if rows.ndim != 5 or rows.shape[2] != len(MODALITIES):
        raise ValueError(f"rows: shape {rows.shape}, expected (B, T, {len(MODALITIES)}, n_layers, dim)")
    if layers:
        rows = rows[:, :, :, list(layers)]
    device = torch.device(device)
    out = {}
    if device.type == "cpu":
        for m in modalities:
            x = rows[:, :, MODALITIES.index(m)].transpose(0, 2, 1, 3)  # (B, L, T, D) view
            out[m] = torch.from_numpy(np.ascontiguousarray(x).astype(np.float32))
        return out
    feats = torch.from_numpy(np.ascontiguousarray(rows))  # (B, T, 3, L, D)
    if pin and device.type == "cuda":
        feats = feats.pin_memory()
    feats = feats.to(device, non_blocking=True)
    for m in modalities:
        out[m] = feats[:, :, MODALITIES.index(m)].permute(0, 2, 1, 3).float().contiguous()  # (B, L, T, D)
    return out
