"""The backbone registry: every backbone by its ``features.backbone`` name, defined here only.

Each :class:`BackboneEntry` names its family, its published checkpoint and its loader, a plain
function ``(features config, family, name) -> Backbone``: :func:`~mirage.features.pretrained.load_pretrained`
for a checkpoint, :func:`~mirage.features.tiny.build_tiny` for a tiny random variant built locally.
:data:`BACKBONES` lists every backbone of the paper's backbone ablation, each with a tiny variant of
its architecture (``tiny`` for Qwen3-Omni, ``tiny-qwen2.5-omni``). Importing this module builds
nothing: the loaders import torch and transformers when called. To add a backbone, add an entry to
``_ENTRIES`` and its name to ``features.backbone`` in the config.

Imports run one way: this registry -> loaders (``tiny``, ``pretrained``) -> the interface
(:class:`~mirage.features.interface.Backbone`, re-exported here).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mirage.config import ConfigError, FeaturesConfig
from mirage.features.families import FAMILIES, Family, FamilyName
from mirage.features.interface import Backbone
from mirage.features.pretrained import load_pretrained
from mirage.features.tiny import build_tiny

__all__ = ["BACKBONES", "Backbone", "BackboneEntry", "Loader", "load_backbone"]

Loader = Callable[[FeaturesConfig, Family, str], Backbone]
"""Builds or loads a backbone: (``cfg.features``, the entry's family, the entry's name) -> Backbone."""


@dataclass(frozen=True)
class BackboneEntry:
    """One registered backbone.

    ``model_id`` is the published checkpoint (``None``: a tiny variant, built locally); the loader
    reads ``features.model_id`` (a hub id or a local directory) and refuses the published id of
    another entry. ``n_layers`` and ``dim`` describe the published thinker's features (hidden states
    per token, i.e. decoder layers + 1, and their width); extraction reads both from the loaded
    config. ``tiny`` names the entry's tiny variant (the family's thinker class at
    ``features.tiny`` sizes, with the family's special tokens). ``loader`` builds or loads it.
    """

    name: str
    family: FamilyName
    model_id: str | None
    n_layers: int | None
    dim: int | None
    tiny: str
    description: str
    loader: Loader
    any_checkpoint: bool = False
    """Loads any checkpoint of its family from ``features.model_id`` (the ``qwen3-omni`` name)."""

    @property
    def builds_locally(self) -> bool:
        """A tiny variant: its numbers depend on ``features.tiny``, not on a checkpoint."""
        return self.model_id is None

    def load(self, cfg: FeaturesConfig) -> Backbone:
        """The entry's backbone: built (tiny variant) or loaded from ``cfg.model_id``."""
        if not self.builds_locally:
            self._check_model_id(cfg.model_id)
        return self.loader(cfg, FAMILIES[self.family], self.name)

    def _check_model_id(self, model_id: str) -> None:
        """A published id that belongs to another entry means a mislabelled store: refuse it."""
        owner = next((e for e in BACKBONES.values() if e.model_id == model_id and not e.any_checkpoint), None)
        if owner is None or owner.name == self.name or (self.any_checkpoint and owner.family == self.family):
            return
        raise ConfigError(
            f"features.model_id={model_id!r} is the checkpoint of backbone {owner.name!r}, not of "
            f"features.backbone={self.name!r}; set features.model_id={self.model_id} (or a local copy of it)"
        )


_PUBLISHED = dict(loader=load_pretrained)
_QWEN3_OMNI_30B = dict(family="qwen3_omni", n_layers=49, dim=2048, tiny="tiny", **_PUBLISHED)
_TINY = dict(model_id=None, n_layers=None, dim=None, loader=build_tiny)
_ENTRIES = (
    BackboneEntry(name="qwen2.5-omni-3b", family="qwen2_5_omni", model_id="Qwen/Qwen2.5-Omni-3B", n_layers=37,
                  dim=2048, tiny="tiny-qwen2.5-omni", description="Qwen2.5-Omni 3B thinker (dense, 36 layers)",
                  **_PUBLISHED),
    BackboneEntry(name="qwen2.5-omni-7b", family="qwen2_5_omni", model_id="Qwen/Qwen2.5-Omni-7B", n_layers=29,
                  dim=3584, tiny="tiny-qwen2.5-omni", description="Qwen2.5-Omni 7B thinker (dense, 28 layers)",
                  **_PUBLISHED),
    BackboneEntry(name="qwen3-omni-30b-a3b-instruct", model_id="Qwen/Qwen3-Omni-30B-A3B-Instruct",
                  description="Qwen3-Omni 30B-A3B Instruct thinker (MoE, 48 layers)", **_QWEN3_OMNI_30B),
    BackboneEntry(name="qwen3-omni-30b-a3b-thinking", model_id="Qwen/Qwen3-Omni-30B-A3B-Thinking",
                  description="Qwen3-Omni 30B-A3B Thinking thinker (MoE, 48 layers; the paper's backbone)",
                  **_QWEN3_OMNI_30B),
    BackboneEntry(name="qwen3-omni-30b-a3b-captioner", model_id="Qwen/Qwen3-Omni-30B-A3B-Captioner",
                  description="Qwen3-Omni 30B-A3B Captioner thinker (MoE, 48 layers)", **_QWEN3_OMNI_30B),
    BackboneEntry(name="qwen3-omni", model_id="Qwen/Qwen3-Omni-30B-A3B-Thinking", any_checkpoint=True,
                  description="any Qwen3-Omni checkpoint or saved thinker at features.model_id", **_QWEN3_OMNI_30B),
    BackboneEntry(name="tiny", family="qwen3_omni", tiny="tiny", description="tiny random Qwen3-Omni thinker",
                  **_TINY),
    BackboneEntry(name="tiny-qwen2.5-omni", family="qwen2_5_omni", tiny="tiny-qwen2.5-omni",
                  description="tiny random Qwen2.5-Omni thinker", **_TINY),
)

BACKBONES: dict[str, BackboneEntry] = {e.name: e for e in _ENTRIES}
"""Every backbone by its ``features.backbone`` name."""


def load_backbone(cfg: FeaturesConfig) -> Backbone:
    """Load the backbone named by ``cfg.backbone`` (see :data:`BACKBONES`) and check its token ids."""
    if cfg.backbone not in BACKBONES:
        raise ConfigError(f"features.backbone: unknown backbone {cfg.backbone!r}; expected one of {sorted(BACKBONES)}")
    backbone = BACKBONES[cfg.backbone].load(cfg)
    backbone.check_processor()
    return backbone
