"""The features of one video, in this process (no Ray, no store): ``mirage features one``.

``extract_video`` runs every pass of one movie (and its transcript, if any) through the backbone
of ``cfg.features`` and returns each modality with its own frame count; ``save_features`` writes
them as safetensors.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mirage.config import MODALITIES, Config
from mirage.errors import DataError
from mirage.features.extract import Extractor
from mirage.features.interface import Backbone


def extract_video(
    cfg: Config, video: str | os.PathLike, transcript: str | os.PathLike | None = None, backbone: Backbone | None = None
) -> dict[str, np.ndarray]:
    """Features of one movie file.

    Args:
        cfg: config whose ``features`` section says how to extract (backbone, fusion, windows).
        video: movie file with its audio track.
        transcript: Algonauts-layout tsv of its words (None: no words; text is zeros as long as the video).
        backbone: an already loaded backbone of ``cfg.features`` (loaded here when None).

    Returns:
        ``{"vision", "audio", "text"}`` -> float32 (n_frames_m, n_layers, dim); frame k of each
        modality covers [k / rate_hz, (k + 1) / rate_hz) seconds.
    """
    video = Path(video)
    if not video.is_file():
        raise DataError(f"{video}: movie file not found")
    if transcript is not None and not Path(transcript).is_file():
        raise DataError(f"{transcript}: transcript not found")
    extractor = Extractor(cfg.features, backbone)
    return extractor.extract_stimulus(str(video), None if transcript is None else str(transcript))


def save_features(features: dict[str, np.ndarray], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write ``{modality: (n_frames_m, n_layers, dim)}`` as float32 safetensors (written, then renamed)."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({m: np.ascontiguousarray(features[m], np.float32) for m in MODALITIES}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path
