"""Tiny variants: the real Qwen-Omni thinker and processor classes at tiny sizes, built locally.

Weights are random (seeded by ``cfg.tiny.seed``); the tokenizer is a byte-level BPE trained in
milliseconds with the ``tokenizers`` library and carries the family's special tokens, wrapped in
the family's real processor class, so placeholders expand exactly as they do for the released
checkpoints. Sizes come from ``features.tiny``; everything else (rope layout, token roles, audio and
video time grids) is the family's. No download.
"""

from __future__ import annotations

import json
import string

from mirage.config import FeaturesConfig, TinyBackboneConfig
from mirage.features.families import ENDOFTEXT, QWEN2_5_OMNI, QWEN3_OMNI, Family
from mirage.features.interface import Backbone


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


def build_tokenizer(vocab_size: int, family: Family = QWEN3_OMNI):
    """A Qwen2 tokenizer (byte-level BPE) trained locally, with the family's special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    specials = [ENDOFTEXT, *family.special_tokens.values()]
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
        model_specific_special_tokens=dict(family.special_tokens),
    )


def build_processor(t: TinyBackboneConfig, audio_rate: int, family: Family = QWEN3_OMNI):
    """The family's processor from locally built parts; returns (processor, video processor kwargs)."""
    from transformers import WhisperFeatureExtractor
    from transformers.models.qwen2_vl import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    processor_cls, _, _ = family.classes()
    unit = t.patch_size * 2  # spatial merge 2: frames resize to multiples of this
    size = {"shortest_edge": unit * unit, "longest_edge": t.video_max_pixels}
    vision = dict(patch_size=t.patch_size, temporal_patch_size=2, merge_size=2, size=size)
    processor = processor_cls(
        image_processor=Qwen2VLImageProcessor(**vision),
        video_processor=Qwen2VLVideoProcessor(**vision),
        feature_extractor=WhisperFeatureExtractor(
            feature_size=t.mel_bins, sampling_rate=audio_rate, **family.audio_extractor
        ),
        tokenizer=build_tokenizer(t.vocab_size, family),
    )
    return processor, {"size": size, "cap_pixels_per_frame": False}


def _token_ids(family: Family, tokenizer) -> dict[str, int]:
    return {k: int(tokenizer.convert_tokens_to_ids(v)) for k, v in family.special_tokens.items()}


def _check_vocab(t: TinyBackboneConfig, tokenizer) -> None:
    if len(tokenizer) > t.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than features.tiny.vocab_size={t.vocab_size}")


def _text_config(t: TinyBackboneConfig, rope: dict, **extra) -> dict:
    """Text decoder sizes common to both families (``extra``: family-specific keys)."""
    return dict(
        vocab_size=t.vocab_size, hidden_size=t.hidden, intermediate_size=t.hidden * t.ffn_mult,
        num_hidden_layers=t.n_layers, num_attention_heads=t.heads, num_key_value_heads=t.kv_heads,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, **rope}, **extra,
    )


def _vision_config(t: TinyBackboneConfig, **extra) -> dict:
    """Vision encoder sizes common to both families (spatial merge 2, temporal patch 2)."""
    return dict(
        depth=t.vision_depth, hidden_size=t.vision_hidden, intermediate_size=t.vision_hidden * t.ffn_mult,
        num_heads=t.encoder_heads, patch_size=t.patch_size, spatial_merge_size=2, temporal_patch_size=2,
        out_hidden_size=t.hidden, **extra,
    )


def _audio_config(t: TinyBackboneConfig, **extra) -> dict:
    """Audio encoder sizes common to both families."""
    return dict(
        num_mel_bins=t.mel_bins, encoder_layers=t.audio_layers, encoder_attention_heads=t.encoder_heads,
        encoder_ffn_dim=t.audio_hidden * t.ffn_mult, d_model=t.audio_hidden, output_dim=t.hidden, **extra,
    )


def _special_ids(ids: dict[str, int], placeholder: str) -> dict[str, int]:
    """Config keys of the special ids; ``placeholder`` names the pad ids (``*_token_id`` or ``*_token_index``)."""
    return {
        f"audio_{placeholder}": ids["audio_token"], f"image_{placeholder}": ids["image_token"],
        f"video_{placeholder}": ids["video_token"],
        "audio_start_token_id": ids["audio_bos_token"], "audio_end_token_id": ids["audio_eos_token"],
        "vision_start_token_id": ids["vision_bos_token"], "vision_end_token_id": ids["vision_eos_token"],
    }


def thinker_config(t: TinyBackboneConfig, tokenizer):
    """A tiny ``Qwen3OmniMoeThinkerConfig`` whose special token ids are those of ``tokenizer``."""
    from transformers import Qwen3OmniMoeThinkerConfig

    ids = _token_ids(QWEN3_OMNI, tokenizer)
    _check_vocab(t, tokenizer)
    head_dim = t.hidden // t.heads
    quarter = head_dim // 2 // 4  # rotary pairs split over (time, height, width) as 2:1:1
    mrope = [head_dim // 2 - 2 * quarter, quarter, quarter]
    return Qwen3OmniMoeThinkerConfig(
        text_config=_text_config(
            t, {"mrope_section": mrope, "interleaved": True}, moe_intermediate_size=t.hidden * t.ffn_mult // 2,
            head_dim=head_dim, num_experts=t.experts, num_experts_per_tok=t.experts_per_token,
        ),
        vision_config=_vision_config(
            t, num_position_embeddings=64, deepstack_visual_indexes=list(range(min(t.vision_depth, t.n_layers)))
        ),
        audio_config=_audio_config(t, downsample_hidden_size=t.audio_hidden // 2),
        **_special_ids(ids, "token_id"),
    )


def thinker_config_qwen2_5(t: TinyBackboneConfig, tokenizer):
    """A tiny ``Qwen2_5OmniThinkerConfig`` (dense text model, windowed vision) with ``tokenizer``'s ids.

    As in the released checkpoints, the video/audio/image ids are the ``*_token_index`` fields and the
    vision start/end ids ride along as extra keys (the thinker's rope index reads
    ``vision_start_token_id``). The rotary split over (time, height, width) is the released 1:1.5:1.5
    (16, 24, 24 of 64 pairs), not interleaved; the vision window is the released 8 patches.
    """
    from transformers import Qwen2_5OmniThinkerConfig

    ids = _token_ids(QWEN2_5_OMNI, tokenizer)
    _check_vocab(t, tokenizer)
    head_dim = t.hidden // t.heads
    pairs = head_dim // 2
    spatial = pairs * 3 // 8
    mrope = [pairs - 2 * spatial, spatial, spatial]
    return Qwen2_5OmniThinkerConfig(
        text_config=_text_config(t, {"mrope_section": mrope}),
        vision_config=_vision_config(t, window_size=8 * t.patch_size, fullatt_block_indexes=[t.vision_depth - 1]),
        audio_config=_audio_config(t),
        **_special_ids(ids, "token_index"),
    )


_CONFIGS = {QWEN3_OMNI.name: thinker_config, QWEN2_5_OMNI.name: thinker_config_qwen2_5}


def build_tiny(cfg: FeaturesConfig, family: Family, name: str) -> Backbone:
    """Build ``family``'s tiny thinker (float32, CPU) with seeded random weights, and its processor."""
    import torch  # at call time, as transformers here: the registry imports this module and stays light

    _, thinker_cls, _ = family.classes()
    processor, video_kwargs = build_processor(cfg.tiny, cfg.audio_rate, family)
    config = _CONFIGS[family.name](cfg.tiny, processor.tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.tiny.seed)
        model = thinker_cls(config)
    model.eval().requires_grad_(False)
    return Backbone.from_loaded(name, model, processor, video_kwargs, family=family.name)
