"""The backbone interface: what extraction needs from a loaded Qwen-Omni thinker and its processor.

A backbone is a Qwen-Omni thinker (Qwen3-Omni or Qwen2.5-Omni family) with its processor.
Extraction only needs what :class:`Backbone` holds: the model, the processor, the special token ids
read from the *loaded* model config (the processor's tokens where the config has none), and the
keyword arguments of the processor call and of the forward pass. The registry of named backbones
and their loaders is :mod:`mirage.features.backbone`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mirage.config import ConfigError
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

    def audio_kwargs(self, n_samples: list[int]) -> dict[str, Any]:
        """Processor keywords for a batch of audio clips of ``n_samples`` samples each.

        The Qwen2.5-Omni processor pads every clip with zeros to the extractor's whole chunk (300 s)
        and computes the log-mel of all of it, though the thinker reads only the frames that
        ``feature_attention_mask`` marks. Padding to the longest clip plus one FFT window (rounded up
        to a hop, at most the chunk, so a longer clip is still cut at the chunk) leaves every marked
        frame bit-identical: each frame sees the same samples (zeros past a clip's end either way)
        and the per-clip maximum under the log floor comes from marked frames. Other families pad to
        the longest clip themselves: nothing to add.
        """
        if not FAMILIES[self.family].pads_audio_to_chunk or not n_samples:
            return {}
        fe = self.processor.feature_extractor
        hops = -(-(max(n_samples) + fe.n_fft) // fe.hop_length)
        return {"audio_kwargs": {"max_length": min(int(fe.n_samples), hops * fe.hop_length)}}

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
    import transformers  # at call time: a heavy import that the registry and the store need not pay

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
