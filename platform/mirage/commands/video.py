"""``mirage predict-video``: fMRI predictions for one new movie file."""

from __future__ import annotations

import argparse
from pathlib import Path

from mirage.commands.serve import MODEL_HELP
from mirage.config import Config
from mirage.errors import DataError


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("video", help="movie file with its audio track (mkv, mp4, ...)")
    p.add_argument("--transcript", default=None, help="Algonauts-layout transcript tsv of the movie (default: no text)")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--subject", required=True, help="subject whose head predicts, e.g. sub-01")
    p.add_argument("--n-trs", type=int, default=None, help="TRs to predict (default: the movie's duration in TRs)")
    p.add_argument("--out", default=None, help="predictions .npy (default: <video stem>_fmri.npy here)")


def predict_video_cmd(cfg: Config, a: argparse.Namespace) -> int:
    """Predict fMRI (n_trs, n_parcels) for one movie with a trained model."""
    video = Path(a.video)
    if a.n_trs is not None and a.n_trs < 1:
        raise DataError(f"--n-trs: expected an integer >= 1, got {a.n_trs}")
    from mirage.pipeline.video import predict_video, save_video_prediction  # lazy: see mirage.commands

    pred = predict_video(cfg, video, a.model, a.subject, a.transcript, n_trs=a.n_trs)
    out, feats = save_video_prediction(pred, a.out or f"{video.stem}_fmri.npy")
    print(f"{out}: predictions {pred.fmri.shape} for {pred.subject} ({pred.duration_s:.2f} s of video)")
    print(f"{feats}: features " + ", ".join(f"{m} {v.shape}" for m, v in pred.features.items()))
    return 0
