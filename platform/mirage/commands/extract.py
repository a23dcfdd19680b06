"""``mirage extract``, ``mirage features verify`` and ``mirage features one``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mirage.config import Config
from mirage.features.store import MANIFEST, FeatureStore, open_store, store_key
from mirage.preflight import preflight


def add_extract_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="recompute stimuli already in the store")
    p.add_argument("--local", action="store_true", help="run in this process instead of a Ray Data actor pool")
    p.add_argument("--stimuli", nargs="+", default=None, metavar="ID", help="only these stimulus ids")


def extract(cfg: Config, a: argparse.Namespace) -> int:
    """Extract backbone features of every stimulus into the feature store."""
    preflight(cfg, {"data"} if a.local else {"data", "gpus"}, gpus_for="extract", splits=())
    from mirage.pipeline.inputs import extract_features  # lazy: see mirage.commands

    result = extract_features(cfg, stimuli=a.stimuli, overwrite=a.overwrite, local=a.local, progress=True)
    print(
        f"feature store {result.store}: {len(result.written)} written, {len(result.skipped)} already stored, "
        f"{len(result.failed)} failed ({result.cutoffs} cutoffs in {result.seconds:.1f} s)"
    )
    kept = _stored(result.store) if a.overwrite and result.failed else set()
    for sid, err in sorted(result.failed.items()):
        note = "; its previously stored features are kept" if sid in kept else ""
        print(f"mirage: error: stimulus {sid} failed: {err}{note}", file=sys.stderr)
    return 0 if result.ok else 1


def _stored(root: Path) -> set[str]:
    """Stimuli recorded in the store at ``root`` (none if it holds no manifest)."""
    return set(FeatureStore(root).stimuli()) if (root / MANIFEST).is_file() else set()


def add_verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-checksums", action="store_true", help="check shapes only")


def verify(cfg: Config, a: argparse.Namespace) -> int:
    """Check every file of the feature store against its manifest (an empty store fails)."""
    store = open_store(cfg.features)
    problems = store.verify(check_sums=not a.no_checksums)
    for _name, problem in sorted(problems.items()):
        print(f"mirage: error: {problem}", file=sys.stderr)
    print(f"feature store {store.root}: {len(store.stimuli())} stimuli, {len(problems)} problems")
    return 0 if not problems else 1


def add_one_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("video", help="movie file with its audio track (mkv, mp4, ...)")
    p.add_argument("--transcript", default=None, help="Algonauts-layout transcript tsv of the movie (default: no text)")
    p.add_argument("--out", required=True, help="output .safetensors: vision, audio, text as float32 (n_frames, n_layers, dim)")


def one(cfg: Config, a: argparse.Namespace) -> int:
    """Extract the features of one movie in this process into a safetensors file."""
    from mirage.features.one import extract_video, save_features  # imports torch (~2 s): lazy for --help

    feats = extract_video(cfg, a.video, a.transcript)
    f = cfg.features
    meta = {"backbone": f.backbone, "model_id": f.model_id, "fusion": f.fusion, "rate_hz": str(f.rate_hz),
            "key": store_key(f)}
    out = save_features(feats, a.out, metadata=meta)
    print(f"{out}: " + ", ".join(f"{m} {tuple(v.shape)}" for m, v in feats.items()))
    return 0
