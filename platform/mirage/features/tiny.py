"""The ``tiny`` backbone: the real Qwen3-Omni thinker classes at tiny sizes, built locally.

Weights are random (seeded by ``cfg.tiny.seed``); the tokenizer is a byte-level BPE trained in
milliseconds with the ``tokenizers`` library and carries the Qwen special tokens, so the
processor expands placeholders exactly as it does for the released checkpoint. No download.
"""

from __future__ import annotations

import json
import string

from mirage.config import FeaturesConfig, TinyBackboneConfig
from mirage.features.backbone import Backbone

SPECIAL_TOKENS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "audio_token": "<|audio_pad|>",
    "vision_bos_token": "<|vision_start|>",
    "vision_eos_token": "<|vision_end|>",
    "audio_bos_token": "<|audio_start|>",
    "audio_eos_token": "<|audio_end|>",
    "im_start_token": "<|im_start|>",
    "im_end_token": "<|im_end|>",
}
"""Named special tokens of the Qwen3-Omni tokenizer that the processor and prompt use."""

ENDOFTEXT = "<|endoftext|>"


def _corpus() -> list[str]:
    """A small deterministic training text: letters, digits and common English words."""
    words = (
        "the a and to of i you it is in that what this no we me my your so on be do are not have he she "
        "just know oh okay hey yeah well right here there with was for all get like can go out up look "
        "ross rachel monica chandler joey phoebe coffee apartment friends movie life bourne"
    ).split()
    lines = [" ".join(words[i:] + words[:i]) for i in range(0, len(words), 3)]
    lines.append(string.ascii_letters + string.digits + string.punctuation)
    return lines


def build_tokenizer(vocab_size: int):
    """A Qwen2 tokenizer (byte-level BPE) trained locally, with the Qwen special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    specials = [ENDOFTEXT, *SPECIAL_TOKENS.values()]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    return Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=[tuple(m) for m in model["merges"]],
        model_specific_special_tokens=dict(SPECIAL_TOKENS),
    )


def build_processor(t: TinyBackboneConfig, audio_rate: int):
    """Qwen3OmniMoeProcessor from locally built parts; returns (processor, video processor kwargs)."""
    from transformers import Qwen3OmniMoeProcessor, WhisperFeatureExtractor
    from transformers.models.qwen2_vl import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    unit = t.patch_size * 2  # spatial merge 2: frames resize to multiples of this
    size = {"shortest_edge": unit * unit, "longest_edge": t.video_max_pixels}
    vision = dict(patch_size=t.patch_size, temporal_patch_size=2, merge_size=2, size=size)
    processor = Qwen3OmniMoeProcessor(
        image_processor=Qwen2VLImageProcessor(**vision),
        video_processor=Qwen2VLVideoProcessor(**vision),
        feature_extractor=WhisperFeatureExtractor(feature_size=t.mel_bins, sampling_rate=audio_rate),
        tokenizer=build_tokenizer(t.vocab_size),
    )
    return processor, {"size": size, "cap_pixels_per_frame": False}


def thinker_config(t: TinyBackboneConfig, tokenizer):
    """A tiny ``Qwen3OmniMoeThinkerConfig`` whose special token ids are those of ``tokenizer``."""
    from transformers import Qwen3OmniMoeThinkerConfig

    ids = {k: int(tokenizer.convert_tokens_to_ids(v)) for k, v in SPECIAL_TOKENS.items()}
    if len(tokenizer) > t.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than features.tiny.vocab_size={t.vocab_size}")
    head_dim = t.hidden // t.heads
    quarter = head_dim // 2 // 4  # rotary pairs split over (time, height, width) as 2:1:1
    mrope = [head_dim // 2 - 2 * quarter, quarter, quarter]
    return Qwen3OmniMoeThinkerConfig(
        text_config=dict(
            vocab_size=t.vocab_size,
            hidden_size=t.hidden,
            intermediate_size=t.hidden * t.ffn_mult,
            moe_intermediate_size=t.hidden * t.ffn_mult // 2,
            num_hidden_layers=t.n_layers,
            num_attention_heads=t.heads,
            num_key_value_heads=t.kv_heads,
            head_dim=head_dim,
            num_experts=t.experts,
            num_experts_per_tok=t.experts_per_token,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope, "interleaved": True},
        ),
        vision_config=dict(
            depth=t.vision_depth,
            hidden_size=t.vision_hidden,
            intermediate_size=t.vision_hidden * t.ffn_mult,
            num_heads=t.encoder_heads,
            patch_size=t.patch_size,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=t.hidden,
            num_position_embeddings=64,
            deepstack_visual_indexes=list(range(min(t.vision_depth, t.n_layers))),
        ),
        audio_config=dict(
            num_mel_bins=t.mel_bins,
            encoder_layers=t.audio_layers,
            encoder_attention_heads=t.encoder_heads,
            encoder_ffn_dim=t.audio_hidden * t.ffn_mult,
            d_model=t.audio_hidden,
            output_dim=t.hidden,
            downsample_hidden_size=t.audio_hidden // 2,
        ),
        audio_token_id=ids["audio_token"],
        image_token_id=ids["image_token"],
        video_token_id=ids["video_token"],
        audio_start_token_id=ids["audio_bos_token"],
        audio_end_token_id=ids["audio_eos_token"],
        vision_start_token_id=ids["vision_bos_token"],
        vision_end_token_id=ids["vision_eos_token"],
    )


def load_tiny(cfg: FeaturesConfig) -> Backbone:
    """Build the tiny thinker (float32, CPU) with seeded random weights, and its processor."""
    import torch
    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

    processor, video_kwargs = build_processor(cfg.tiny, cfg.audio_rate)
    config = thinker_config(cfg.tiny, processor.tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.tiny.seed)
        model = Qwen3OmniMoeThinkerForConditionalGeneration(config)
    model.eval().requires_grad_(False)
    return Backbone.from_loaded("tiny", model, processor, video_kwargs)
