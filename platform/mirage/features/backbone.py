"""The backbone interface and the name -> loader registry.

A backbone is a Qwen3-Omni thinker (``Qwen3OmniMoeThinkerForConditionalGeneration``) with its
processor. Extraction only needs what :class:`Backbone` holds: the model, the processor, the
modality token ids read from the *loaded* model config, and processor keyword arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mirage.config import ConfigError, FeaturesConfig


@dataclass
class Backbone:
    """A loaded thinker and processor, ready for forward passes.

    ``n_layers`` counts the hidden states kept per token: embeddings + every decoder layer.
    """

    name: str
    model: Any  # Qwen3OmniMoeThinkerForConditionalGeneration, eval mode
    processor: Any  # Qwen3OmniMoeProcessor
    video_token_id: int
    audio_token_id: int
    n_layers: int
    dim: int
    spatial_merge_size: int
    device: str
    video_kwargs: dict[str, Any] = field(default_factory=dict)
    family: str = "qwen3_omni"
    """Model family: ``qwen3_omni`` or ``qwen2_5_omni`` (prompt layout and processor keywords differ)."""
    token_ids: dict[str, int] = field(default_factory=dict)
    """Special token ids read from the loaded config (tokenizer where the config has none): keys
    ``video``, ``audio``, ``image``, ``vision_start``, ``vision_end``, ``audio_start``, ``audio_end``."""

    @classmethod
    def from_loaded(cls, name: str, model: Any, processor: Any, video_kwargs: dict[str, Any] | None = None) -> "Backbone":
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
        )

    def processor_kwargs(self, audio_in_video: bool) -> dict[str, Any]:
        """Keywords for ``processor(text=..., videos=..., audio=...)`` beyond the media themselves.

        ``audio_in_video``: the audio window is the video's own track, interleaved into the video
        block (native fusion). The keyword for that changed in transformers 5.23.
        """
        kw: dict[str, Any] = {"return_tensors": "pt", "padding": True, **self.video_kwargs}
        if audio_in_video:
            if _transformers_at_least(5, 23) and self.family == "qwen3_omni":
                kw.update(load_audio_from_video=True, audio_from_video_indices=[0])
            else:
                kw["use_audio_in_video"] = True
        return kw

    def forward_kwargs(self, audio_in_video: bool) -> dict[str, Any]:
        """Keywords for the thinker's forward beyond the processor outputs."""
        kw: dict[str, Any] = {"output_hidden_states": True, "return_dict": True, "use_cache": False}
        if audio_in_video:
            kw["use_audio_in_video"] = True
        return kw

    def check_processor(self) -> None:
        """The processor's placeholder tokens must map to the model config's token ids."""
        tok = self.processor.tokenizer
        for what, token, expected in (
            ("video", self.processor.video_token, self.video_token_id),
            ("audio", self.processor.audio_token, self.audio_token_id),
        ):
            got = tok.convert_tokens_to_ids(token)
            if got != expected:
                raise ConfigError(
                    f"backbone {self.name}: processor {what} token {token!r} has id {got}, "
                    f"but the model config expects {what}_token_id={expected}"
                )


Loader = Callable[[FeaturesConfig], Backbone]


def _transformers_at_least(major: int, minor: int) -> bool:
    import transformers

    parts = transformers.__version__.split(".")
    return (int(parts[0]), int(parts[1])) >= (major, minor)

_TOKEN_NAMES = {
    "video": ("<|video_pad|>", ("video_token_id", "video_token_index")),
    "audio": ("<|audio_pad|>", ("audio_token_id", "audio_token_index")),
    "image": ("<|image_pad|>", ("image_token_id", "image_token_index")),
    "vision_start": ("<|vision_start|>", ("vision_start_token_id",)),
    "vision_end": ("<|vision_end|>", ("vision_end_token_id",)),
    "audio_start": ("<|audio_start|>", ("audio_start_token_id",)),
    "audio_end": ("<|audio_end|>", ("audio_end_token_id",)),
}


def _special_token_ids(config: Any, processor: Any) -> dict[str, int]:
    """Ids of the multimodal special tokens: the config's attribute (either naming), else the tokenizer's."""
    out: dict[str, int] = {}
    for key, (token, attrs) in _TOKEN_NAMES.items():
        value = next((getattr(config, a) for a in attrs if getattr(config, a, None) is not None), None)
        if value is None:
            value = processor.tokenizer.convert_tokens_to_ids(token)
        out[key] = int(value)
    return out


def _load_tiny(cfg: FeaturesConfig) -> Backbone:
    from mirage.features.tiny import load_tiny

    return load_tiny(cfg)


def _load_qwen3_omni(cfg: FeaturesConfig) -> Backbone:
    from mirage.features.qwen3_omni import load_qwen3_omni

    return load_qwen3_omni(cfg)


BACKBONES: dict[str, Loader] = {"tiny": _load_tiny, "qwen3-omni": _load_qwen3_omni}


def load_backbone(cfg: FeaturesConfig) -> Backbone:
    """Load the backbone named by ``cfg.backbone`` (see :data:`BACKBONES`)."""
    if cfg.backbone not in BACKBONES:
        raise ConfigError(f"features.backbone: unknown backbone {cfg.backbone!r}; expected one of {sorted(BACKBONES)}")
    backbone = BACKBONES[cfg.backbone](cfg)
    backbone.check_processor()
    return backbone
