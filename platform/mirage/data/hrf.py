"""Canonical haemodynamic response (SPM double gamma) and convolution with it."""

from __future__ import annotations

import math

import numpy as np


def canonical_hrf(dt: float, length_s: float = 32.0, peak_s: float = 6.0, undershoot_s: float = 16.0,
                  ratio: float = 1 / 6) -> np.ndarray:
    """SPM canonical HRF sampled every ``dt`` seconds, normalised to unit sum: (n_taps,)."""
    t = np.arange(0.0, length_s, dt)
    g1 = t ** (peak_s - 1) * np.exp(-t) / math.gamma(peak_s)
    g2 = t ** (undershoot_s - 1) * np.exp(-t) / math.gamma(undershoot_s)
    h = g1 - ratio * g2
    return h / h.sum()


def convolve_hrf(x: np.ndarray, dt: float) -> np.ndarray:
    """Causal convolution of time series with the canonical HRF along axis 0.

    x: (n_times, ...) sampled every ``dt`` seconds -> (n_times, ...).
    """
    h = canonical_hrf(dt)
    x2 = np.asarray(x, dtype=np.float64).reshape(len(x), -1)  # (T, C)
    out = np.stack([np.convolve(x2[:, c], h)[: len(x2)] for c in range(x2.shape[1])], axis=1)
    return out.reshape(np.shape(x))
