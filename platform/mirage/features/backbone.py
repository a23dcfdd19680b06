"""The backbone interface and the name -> entry registry.

A backbone is a Qwen-Omni thinker (Qwen3-Omni or Qwen2.5-Omni family) with its processor.
Extraction only needs what :class:`Backbone` holds: the model, the processor, the special token ids
read from the *loaded* model config (the processor's tokens where the config has none), and the
keyword arguments of the processor call and of the forward pass.

:data:`BACKBONES` lists every backbone of the paper's backbone ablation, each with a tiny random
variant of its architecture that builds locally (``tiny`` for Qwen3-Omni, ``tiny-qwen2.5-omni``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mirage.config import ConfigError, FeaturesConfig
from mirage.features.families import FAMILIES, FamilyName


@dataclass
class Backbone:
    """A loaded thinker and processor, ready for forward passes.

    ``n_layers`` counts the hidden states kept per token: embeddings + every decoder layer.
    """

    name: str
    model: Any  # a *ThinkerForConditionalGeneration of the family, eval mode
    processor: Any  # the family's processor
    video_token_id: int
    audio_token_id: int
    n_layers: int
    dim: int
    spatial_merge_size: int
    device: str
    video_kwargs: dict[str, Any] = field(default_factory=dict)
    family: FamilyName = "qwen3_omni"
    """Model family: ``qwen3_omni`` or ``qwen2_5_omni`` (token strings, classes and rope details differ)."""
    token_ids: dict[str, int] = field(default_factory=dict)
    """Special token ids read from the loaded config (the processor's tokens where the config has none):
    keys ``video``, ``audio``, ``image``, ``vision_start``, ``vision_end``, ``audio_start``, ``audio_end``."""

    @classmethod
    def from_loaded(
        cls,
        name: str,
        model: Any,
        processor: Any,
        video_kwargs: dict[str, Any] | None = None,
        family: FamilyName = "qwen3_omni",
    ) -> "Backbone":
        """Wrap a loaded model and processor; token ids and sizes come from ``model.config``."""
        cfg = model.config
        text = cfg.text_config
        return cls(
            token_ids=_special_token_ids(cfg, processor),
            name=name,
            model=model,
            processor=processor,
            video_token_id=int(cfg.video_token_id),
            audio_token_id=int(cfg.audio_token_id),
            n_layers=int(text.num_hidden_layers) + 1,
            dim=int(text.hidden_size),
            spatial_merge_size=int(cfg.vision_config.spatial_merge_size),
            device=str(next(model.parameters()).device),
            video_kwargs=dict(video_kwargs or {}),
            family=family,
        )

    def processor_kwargs(self, audio_in_video: bool, n_videos: int = 1) -> dict[str, Any]:
        """Keywords for ``processor(text=..., videos=..., audio=...)`` beyond the media themselves.

        ``audio_in_video``: audio ``i`` is the track of video ``i`` (``n_videos`` of each, one per
        sequence), interleaved into the video block (native fusion). Both families' processors took
        ``use_audio_in_video`` up to transformers 5.22; from 5.23 they take ``load_audio_from_video``
        plus the video each given audio belongs to.
        """
        kw: dict[str, Any] = {"return_tensors": "pt", "padding": True, **self.video_kwargs}
        if audio_in_video:
            if _transformers_at_least(5, 23):
                kw.update(load_audio_from_video=True, audio_from_video_indices=list(range(n_videos)))
            else:
                kw["use_audio_in_video"] = True
        return kw

    def forward_kwargs(self, audio_in_video: bool) -> dict[str, Any]:
        """Keywords for the thinker's forward beyond the processor outputs (the same for both families)."""
        kw: dict[str, Any] = {"output_hidden_states": True, "return_dict": True, "use_cache": False}
        if audio_in_video:
            kw["use_audio_in_video"] = True
        return kw

    def check_processor(self) -> None:
        """Every special token of the processor must map to the id the model config holds for it."""
        tok = self.processor.tokenizer
        config = self.model.config
        for key, (attr, names) in _TOKENS.items():
            token = getattr(self.processor, attr)
            got = tok.convert_tokens_to_ids(token)
            expected = _config_id(config, names)
            if expected is None:
                expected = self.token_ids[key]
            if got != expected or self.token_ids[key] != expected:
                raise ConfigError(
                    f"backbone {self.name}: processor {key} token {token!r} has id {got}, "
                    f"but the model config expects {names[0]}={expected}"
                )
        for key, value in (("video", self.video_token_id), ("audio", self.audio_token_id)):
            if value != self.token_ids[key]:
                raise ConfigError(
                    f"backbone {self.name}: {key}_token_id={value}, but the model config and processor "
                    f"give {key}_token_id={self.token_ids[key]}"
                )


def _transformers_at_least(major: int, minor: int) -> bool:
    import transformers

    parts = transformers.__version__.split(".")
    return (int(parts[0]), int(parts[1])) >= (major, minor)


_TOKENS: dict[str, tuple[str, tuple[str, ...]]] = {
    "video": ("video_token", ("video_token_id", "video_token_index")),
    "audio": ("audio_token", ("audio_token_id", "audio_token_index")),
    "image": ("image_token", ("image_token_id", "image_token_index")),
    "vision_start": ("vision_bos_token", ("vision_start_token_id",)),
    "vision_end": ("vision_eos_token", ("vision_end_token_id",)),
    "audio_start": ("audio_bos_token", ("audio_start_token_id",)),
    "audio_end": ("audio_eos_token", ("audio_end_token_id",)),
}
"""Key -> (processor attribute holding the token string, config attributes holding its id)."""


def _config_id(config: Any, names: tuple[str, ...]) -> int | None:
    value = next((getattr(config, n) for n in names if getattr(config, n, None) is not None), None)
    return None if value is None else int(value)


def _special_token_ids(config: Any, processor: Any) -> dict[str, int]:
    """Ids of the multimodal special tokens: the config's (either naming), else the processor's token's."""
    out: dict[str, int] = {}
    for key, (attr, names) in _TOKENS.items():
        value = _config_id(config, names)
        if value is None:
            value = int(processor.tokenizer.convert_tokens_to_ids(getattr(processor, attr)))
        out[key] = value
    return out


# ----------------------------------------------------------------------- registry


@dataclass(frozen=True)
class BackboneEntry:
    """One registered backbone.

    ``model_id`` is the published checkpoint (``None``: a tiny variant, built locally); the loader
    reads ``features.model_id`` (a hub id or a local directory) and refuses the published id of
    another entry. ``n_layers`` and ``dim`` describe the published thinker's features (hidden states
    per token, i.e. decoder layers + 1, and their width); extraction reads both from the loaded
    config. ``tiny`` names the entry's tiny variant (the family's thinker class at
    ``features.tiny`` sizes, with the family's special tokens).
    """

    name: str
    family: FamilyName
    model_id: str | None
    n_layers: int | None
    dim: int | None
    tiny: str
    description: str
    any_checkpoint: bool = False
    """Loads any checkpoint of its family from ``features.model_id`` (the ``qwen3-omni`` name)."""

    @property
    def builds_locally(self) -> bool:
        """A tiny variant: its numbers depend on ``features.tiny``, not on a checkpoint."""
        return self.model_id is None

    def load(self, cfg: FeaturesConfig) -> Backbone:
        """The entry's backbone: built (tiny variant) or loaded from ``cfg.model_id``."""
        family = FAMILIES[self.family]
        if self.builds_locally:
            from mirage.features.tiny import build_tiny

            return build_tiny(cfg, family, self.name)
        from mirage.features.pretrained import load_pretrained

        self._check_model_id(cfg.model_id)
        return load_pretrained(cfg, family, self.name, cfg.model_id)

    def _check_model_id(self, model_id: str) -> None:
        """A published id that belongs to another entry means a mislabelled store: refuse it."""
        owner = next((e for e in BACKBONES.values() if e.model_id == model_id and not e.any_checkpoint), None)
        if owner is None or owner.name == self.name or (self.any_checkpoint and owner.family == self.family):
            return
        raise ConfigError(
            f"features.model_id={model_id!r} is the checkpoint of backbone {owner.name!r}, not of "
            f"features.backbone={self.name!r}; set features.model_id={self.model_id} (or a local copy of it)"
        )


_QWEN3_OMNI_30B = dict(family="qwen3_omni", n_layers=49, dim=2048, tiny="tiny")
_ENTRIES = (
    BackboneEntry("qwen2.5-omni-3b", "qwen2_5_omni", "Qwen/Qwen2.5-Omni-3B", 37, 2048, "tiny-qwen2.5-omni",
                  "Qwen2.5-Omni 3B thinker (dense, 36 layers)"),
    BackboneEntry("qwen2.5-omni-7b", "qwen2_5_omni", "Qwen/Qwen2.5-Omni-7B", 29, 3584, "tiny-qwen2.5-omni",
                  "Qwen2.5-Omni 7B thinker (dense, 28 layers)"),
    BackboneEntry(name="qwen3-omni-30b-a3b-instruct", model_id="Qwen/Qwen3-Omni-30B-A3B-Instruct",
                  description="Qwen3-Omni 30B-A3B Instruct thinker (MoE, 48 layers)", **_QWEN3_OMNI_30B),
    BackboneEntry(name="qwen3-omni-30b-a3b-thinking", model_id="Qwen/Qwen3-Omni-30B-A3B-Thinking",
                  description="Qwen3-Omni 30B-A3B Thinking thinker (MoE, 48 layers; the paper's backbone)",
                  **_QWEN3_OMNI_30B),
    BackboneEntry(name="qwen3-omni-30b-a3b-captioner", model_id="Qwen/Qwen3-Omni-30B-A3B-Captioner",
                  description="Qwen3-Omni 30B-A3B Captioner thinker (MoE, 48 layers)", **_QWEN3_OMNI_30B),
    BackboneEntry(name="qwen3-omni", model_id="Qwen/Qwen3-Omni-30B-A3B-Thinking", any_checkpoint=True,
                  description="any Qwen3-Omni checkpoint or saved thinker at features.model_id", **_QWEN3_OMNI_30B),
    BackboneEntry("tiny", "qwen3_omni", None, None, None, "tiny", "tiny random Qwen3-Omni thinker"),
    BackboneEntry("tiny-qwen2.5-omni", "qwen2_5_omni", None, None, None, "tiny-qwen2.5-omni",
                  "tiny random Qwen2.5-Omni thinker"),
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
