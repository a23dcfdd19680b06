"""The main job: dataset and features, the Tune sweep, the ensemble of its best trials, the registry.

Everything runs in one Ray session (joined, or started and shut down at the end), so a
feature extraction, the sweep and the ensemble's member training share it.
"""

from __future__ import annotations

from dataclasses import dataclass

from mirage.config import Config
from mirage.distributed.cluster import init_ray, ray_session
from mirage.distributed.sweep import SweepResult, load_sweep, run_sweep
from mirage.pipeline.ensemble import EnsembleOutcome, build_ensemble
from mirage.pipeline.inputs import ensure_inputs
from mirage.preflight import preflight


@dataclass
class SweepOutcome:
    """A sweep and the ensemble built from it.

    Attributes:
        sweep: the trials and their scores; ``sweep.interrupted`` when it stopped early (resumable).
        ensemble: the registered ensemble, or None (``ensemble=False``, or the sweep was interrupted).
    """

    sweep: SweepResult
    ensemble: EnsembleOutcome | None = None


def sweep_and_ensemble(cfg: Config, *, ensemble: bool = True) -> SweepOutcome:
    """Dataset and features (:func:`mirage.pipeline.inputs.ensure_inputs`), then the Tune sweep and,
    unless ``ensemble`` is False or the sweep was interrupted, the ensemble built from it.

    The dataset and store are checked (:func:`mirage.preflight.preflight`) once they exist and
    before the sweep; Ray starts only once the data is there (or for a missing extraction).
    """
    with ray_session(cfg.ray, start=False):
        ensure_inputs(cfg)
        preflight(cfg, {"data", "features"})
        init_ray(cfg.ray)
        res = run_sweep(cfg)
        if res.interrupted or not ensemble:
            return SweepOutcome(res)
        return SweepOutcome(res, build_ensemble(cfg, res))


def ensemble_of_sweep(cfg: Config) -> SweepOutcome:
    """Rebuild the ensemble of the finished sweep ``cfg.sweep.name`` (train members, weight, register)."""
    res = load_sweep(cfg)
    with ray_session(cfg.ray):
        return SweepOutcome(res, build_ensemble(cfg, res))
