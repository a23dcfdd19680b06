"""The two Qwen-Omni model families: their transformers classes and special-token layout.

A family fixes everything that is the same for all its checkpoints: the processor and thinker
classes, the ``model_type`` of a saved thinker and of a full (thinker + talker) checkpoint, and the
tokenizer's multimodal special tokens under the processor attribute that names each of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FamilyName = Literal["qwen3_omni", "qwen2_5_omni"]

ENDOFTEXT = "<|endoftext|>"


@dataclass(frozen=True)
class Family:
    """One model family.

    ``special_tokens`` maps the tokenizer/processor attribute (``video_token``,
    ``vision_bos_token`` ...) to the released token string; a tiny tokenizer numbers them in this
    order after ``<|endoftext|>`` (Qwen2.5-Omni: the released id order; Qwen3-Omni: the order the
    ``tiny`` backbone has always used, so that its features stay the same).
    """

    name: FamilyName
    processor_class: str
    thinker_class: str
    full_class: str
    thinker_model_type: str
    full_model_type: str
    special_tokens: dict[str, str]
    audio_extractor: dict[str, int] = field(default_factory=dict)
    """Settings of the released ``WhisperFeatureExtractor`` that differ from the class defaults."""
    pads_audio_to_chunk: bool = False
    """Whether the processor pads every audio clip to the extractor's whole chunk (``n_samples``) before
    the log-mel; see :meth:`mirage.features.interface.Backbone.audio_kwargs`."""

    def classes(self) -> tuple[type, type, type]:
        """(processor, thinker, full model) classes from transformers."""
        import transformers

        return tuple(getattr(transformers, n) for n in (self.processor_class, self.thinker_class, self.full_class))


QWEN3_OMNI = Family(
    name="qwen3_omni",
    processor_class="Qwen3OmniMoeProcessor",
    thinker_class="Qwen3OmniMoeThinkerForConditionalGeneration",
    full_class="Qwen3OmniMoeForConditionalGeneration",
    thinker_model_type="qwen3_omni_moe_thinker",
    full_model_type="qwen3_omni_moe",
    special_tokens={
        "image_token": "<|image_pad|>",
        "video_token": "<|video_pad|>",
        "audio_token": "<|audio_pad|>",
        "vision_bos_token": "<|vision_start|>",
        "vision_eos_token": "<|vision_end|>",
        "audio_bos_token": "<|audio_start|>",
        "audio_eos_token": "<|audio_end|>",
        "im_start_token": "<|im_start|>",
        "im_end_token": "<|im_end|>",
    },
)

QWEN2_5_OMNI = Family(
    name="qwen2_5_omni",
    processor_class="Qwen2_5OmniProcessor",
    thinker_class="Qwen2_5OmniThinkerForConditionalGeneration",
    full_class="Qwen2_5OmniForConditionalGeneration",
    thinker_model_type="qwen2_5_omni_thinker",
    full_model_type="qwen2_5_omni",
    special_tokens={
        "im_start_token": "<|im_start|>",
        "im_end_token": "<|im_end|>",
        "audio_token": "<|AUDIO|>",
        "audio_bos_token": "<|audio_bos|>",
        "audio_eos_token": "<|audio_eos|>",
        "vision_bos_token": "<|vision_bos|>",
        "vision_eos_token": "<|vision_eos|>",
        "image_token": "<|IMAGE|>",
        "video_token": "<|VIDEO|>",
    },
    # the processor pads every clip to chunk_length seconds (and cuts it there): 300 s, not Whisper's 30 s
    audio_extractor={"chunk_length": 300},
    pads_audio_to_chunk=True,
)

FAMILIES: dict[str, Family] = {f.name: f for f in (QWEN3_OMNI, QWEN2_5_OMNI)}
