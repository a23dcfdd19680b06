"""The inputs of training: a dataset in the Algonauts 2025 layout and its feature store.

:func:`extract_features` fills the store (in this process, or on a Ray Data actor pool);
:func:`ensure_inputs` makes both exist before a sweep, creating only what is missing.
"""

from __future__ import annotations

from pathlib import Path

from mirage.config import Config
from mirage.data.synth import write_synthetic
from mirage.distributed.cluster import ray_session
from mirage.distributed.extract import run_extract
from mirage.errors import DataError, MirageError
from mirage.features.extract import ExtractResult, extract_all, stimuli_of
from mirage.features.store import open_store
from mirage.preflight import on_cluster


def has_dataset(root: Path) -> bool:
    """Whether ``root`` holds the Algonauts 2025 layout's ``fmri/`` and ``stimuli/`` folders."""
    return (root / "fmri").is_dir() and (root / "stimuli").is_dir()


def extract_features(
    cfg: Config,
    *,
    stimuli: list[str] | None = None,
    overwrite: bool = False,
    local: bool = False,
    progress: bool = False,
) -> ExtractResult:
    """Extract the features of ``stimuli`` (default: every stimulus of ``data.root``) into the store.

    Args:
        stimuli: stimulus ids; None = all.
        overwrite: recompute stimuli already stored.
        local: in this process instead of a Ray Data actor pool (which joins a running Ray, or
            starts one for this call if anything is left to extract).
        progress: local: the stimuli done on stderr; Ray: one line per stored stimulus on stdout.
    """
    if local:
        return extract_all(cfg, stimuli=stimuli, overwrite=overwrite, progress=progress)
    say = (lambda msg: print(msg, flush=True)) if progress else None
    with ray_session(cfg.ray, start=False):
        return run_extract(cfg, overwrite=overwrite, stimuli=stimuli, progress=say)


def ensure_inputs(cfg: Config) -> None:
    """Dataset and feature store, created on the embedded default when missing.

    The synthetic dataset is written to a missing ``data.root`` only by a local run of a preset
    that says so (``data.synthetic``, the demo); otherwise a missing or empty ``data.root`` is a
    DataError naming it. Missing features are extracted (only what is missing) on a Ray Data
    actor pool.

    Raises:
        DataError: no dataset at ``data.root`` and none to be written there.
        MirageError: the extraction of some stimulus failed.
    """
    root = Path(cfg.data.root)
    if not has_dataset(root):
        if on_cluster(cfg):
            raise DataError(
                f"data.root={root}: no dataset there (expected fmri/ and stimuli/ in the Algonauts 2025 layout); "
                "on a cluster stage the dataset on shared storage and pass --set data.root=<path>"
            )
        if not cfg.data.synthetic:
            state = "does not exist" if not root.exists() else "no dataset there"
            raise DataError(
                f"data.root={root}: {state} (expected fmri/ and stimuli/ in the Algonauts 2025 layout); "
                "point it to the release with --set data.root=<path>, or set data.synthetic=true "
                "to write the synthetic dataset there"
            )
        print(f"[mirage] data.synthetic=true: writing the synthetic dataset to {root}", flush=True)
        write_synthetic(root, cfg.data.synth, tr=cfg.data.tr, progress=False)
    store = open_store(cfg.features, must_exist=False)
    missing = [s for s in stimuli_of(cfg) if store is None or not store.has(s)]
    if missing:
        print(f"[mirage] extracting features of {len(missing)} stimuli into {cfg.features.store}", flush=True)
        result = extract_features(cfg)
        if result.failed:
            raise MirageError(f"feature extraction failed for {result.failed}; see `mirage extract` for details")
