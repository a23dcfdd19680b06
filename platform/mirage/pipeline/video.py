"""fMRI predictions for one new video: backbone features, then any trained model.

``predict_video`` is the whole path from a movie file (and optionally its transcript) to
(n_trs, n_parcels) predictions for one subject: the features of
:func:`mirage.features.one.extract_video` (each modality with its own frame count) are laid out
as one feature-store array and predicted by a :class:`mirage.predictor.Predictor` (an exported
model, an ensemble or the published weights). No Ray.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mirage.config import MODALITIES, Config
from mirage.data.media import MediaReader
from mirage.errors import DataError, ModelLoadError
from mirage.features.one import extract_video, save_features
from mirage.features.store import store_key
from mirage.tracking.models import load_predictor


@dataclass
class VideoPrediction:
    """Predictions for one video and the features they were computed from."""

    fmri: np.ndarray
    """(n_trs, n_parcels) float32."""
    features: dict[str, np.ndarray]
    """modality -> (n_frames_m, n_layers, dim) float32, each modality its own frame count."""
    subject: str
    duration_s: float


def stack_modalities(features: dict[str, np.ndarray]) -> np.ndarray:
    """Per-modality features -> one store-layout array, zero beyond each modality's own length.

    Args:
        features: modality -> (n_frames_m, n_layers, dim), for every modality of ``MODALITIES``.

    Returns:
        (max_m n_frames_m, 3, n_layers, dim) float32, modality axis in ``MODALITIES`` order.
    """
    missing = [m for m in MODALITIES if m not in features]
    if missing:
        raise DataError(f"features: modalities {missing} missing; expected {list(MODALITIES)}")
    shapes = {m: np.shape(features[m]) for m in MODALITIES}
    if any(len(s) != 3 for s in shapes.values()) or len({s[1:] for s in shapes.values()}) != 1:
        raise DataError(f"features: shapes {shapes}, expected (n_frames, n_layers, dim) with one n_layers and dim")
    n = max(s[0] for s in shapes.values())
    n_layers, dim = shapes[MODALITIES[0]][1:]
    out = np.zeros((n, len(MODALITIES), n_layers, dim), np.float32)  # (T, 3, L, D)
    for k, m in enumerate(MODALITIES):
        out[: shapes[m][0], k] = features[m]
    return out


def video_n_trs(duration_s: float, tr: float) -> int:
    """TRs of a scan as long as the movie: ``max(1, round(duration / TR))``."""
    return max(1, int(round(float(duration_s) / tr)))


def predict_video(
    cfg: Config,
    video: str | os.PathLike,
    model: str,
    subject: str,
    transcript: str | os.PathLike | None = None,
    n_trs: int | None = None,
    tracking_uri: str | None = None,
    features: dict[str, np.ndarray] | None = None,
) -> VideoPrediction:
    """Predict one subject's fMRI for a movie file.

    Args:
        cfg: config whose ``features`` section says how to extract (the backbone the model was
            trained on); ``data.tr`` sets the TR grid.
        video: movie file with its audio track.
        model: model URI or directory (``models:/``, ``runs:/``, exported model, ensemble,
            published weights).
        subject: subject whose head predicts (``sub-01``).
        transcript: Algonauts-layout tsv of the movie's words (None = no text).
        n_trs: TRs to predict; default: the movie's duration in TRs.
        features: the movie's features when already extracted (as :func:`extract_video` returns
            them, e.g. read back from ``mirage features one``); None = extract them here.

    Raises:
        ModelLoadError: the model cannot be loaded or was trained on other features.
        DataError: the media, transcript or subject are not usable.
    """
    with MediaReader(video) as media:  # a missing or unreadable movie fails before the model loads
        duration = float(media.printed_duration)  # the duration the reference trims its predictions to
    predictor = load_predictor(model, tracking_uri=tracking_uri or cfg.tracking.uri)
    predictor.subject_index(subject)
    key = store_key(cfg.features)
    if predictor.feature_key and predictor.feature_key != key:
        raise ModelLoadError(
            f"{model}: trained on features {predictor.feature_key}, but the config extracts {key}; "
            "run with the --config/--set the model was trained with"
        )
    if features is None:
        features = extract_video(cfg, Path(video), Path(transcript) if transcript else None)
    stacked = stack_modalities(features)
    if n_trs is None:
        n_trs = video_n_trs(duration, cfg.data.tr)
    fmri = predictor.predict_run(stacked, subject, int(n_trs))
    return VideoPrediction(fmri=fmri, features=features, subject=subject, duration_s=duration)


def save_video_prediction(pred: VideoPrediction, out: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``out`` (.npy, (n_trs, n_parcels) float32) and ``<stem>.features.safetensors`` beside it.

    Each file appears whole or not at all (written under a temporary name, then renamed).
    """
    out = Path(out)
    if out.suffix != ".npy":
        out = out.with_name(out.name + ".npy")
    out.parent.mkdir(parents=True, exist_ok=True)
    feats = save_features(pred.features, out.with_name(out.stem + ".features.safetensors"),
                          metadata={"subject": pred.subject, "duration_s": repr(pred.duration_s)})
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.npy")
    try:
        np.save(tmp, pred.fmri.astype(np.float32, copy=False))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out, feats
