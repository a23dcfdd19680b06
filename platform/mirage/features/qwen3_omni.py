"""The ``qwen3-omni`` backbone: the released Qwen3-Omni thinker and its processor.

Loaded with ``local_files_only`` (by default) so that N actors never race to download ~60 GB:
fetch the checkpoint once beforehand (``huggingface-cli download <id> --revision <rev>``) or point
``features.model_id`` at a local directory.
"""

from __future__ import annotations

import importlib.util

from mirage.config import FeaturesConfig
from mirage.errors import ModelLoadError
from mirage.features.backbone import Backbone


def load_qwen3_omni(cfg: FeaturesConfig) -> Backbone:
    """Load ``cfg.model_id`` at ``cfg.revision`` in ``cfg.dtype`` on the GPU (CPU when none)."""
    import torch
    from transformers import (
        AutoConfig,
        Qwen3OmniMoeForConditionalGeneration,
        Qwen3OmniMoeProcessor,
        Qwen3OmniMoeThinkerForConditionalGeneration,
    )

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, cfg.dtype) if device == "cuda" else torch.float32
    common: dict = dict(revision=cfg.revision, local_files_only=cfg.local_files_only, dtype=dtype)
    if device == "cuda" and importlib.util.find_spec("accelerate") is not None:
        common["device_map"] = device  # weights go straight to the GPU
    try:
        files = dict(revision=cfg.revision, local_files_only=cfg.local_files_only)
        processor = Qwen3OmniMoeProcessor.from_pretrained(cfg.model_id, **files)
        model_type = AutoConfig.from_pretrained(cfg.model_id, **files).model_type
        if model_type == "qwen3_omni_moe_thinker":  # a thinker saved on its own
            model = Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(cfg.model_id, **common)
        else:  # the released checkpoint: keep the thinker, never build the talker
            model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(
                cfg.model_id, enable_audio_output=False, **common
            ).thinker
    except (OSError, ValueError) as e:  # missing files; a path that is no repo id
        where = "local cache/path only" if cfg.local_files_only else "hub"
        raise ModelLoadError(
            f"features.model_id={cfg.model_id!r} (revision {cfg.revision!r}, {where}): cannot load the "
            f"Qwen3-Omni thinker or processor: {e}. Expected a downloaded checkpoint or a local directory."
        ) from None
    model.to(device).eval().requires_grad_(False)
    return Backbone.from_loaded("qwen3-omni", model, processor)
