"""Released Qwen-Omni checkpoints (or a local copy): the thinker and its processor.

Loaded with ``local_files_only`` (by default) so that N actors never race to download tens of GB:
fetch the checkpoint once beforehand (``huggingface-cli download <id> --revision <rev>``) or point
``features.model_id`` at a local directory. Only the thinker is built, from a thinker saved on its own
or from a full checkpoint (thinker + talker), whose talker is neither built nor read.
"""

from __future__ import annotations

import importlib.util

from mirage.config import FeaturesConfig
from mirage.errors import ModelLoadError
from mirage.features.families import Family
from mirage.features.interface import Backbone


def load_pretrained(cfg: FeaturesConfig, family: Family, name: str) -> Backbone:
    """Load ``cfg.model_id`` at ``cfg.revision``: in ``cfg.dtype`` on the GPU when one is visible and
    ``cfg.gpus_per_actor > 0``, else in float32 on the CPU."""
    model_id = cfg.model_id
    import torch  # at call time: the registry imports this module and stays light
    from transformers import AutoConfig

    processor_cls, thinker_cls, _ = family.classes()
    device = "cuda" if torch.cuda.is_available() and cfg.gpus_per_actor > 0 else "cpu"
    dtype = getattr(torch, cfg.dtype) if device == "cuda" else torch.float32
    files = dict(revision=cfg.revision, local_files_only=cfg.local_files_only)
    common: dict = dict(files, dtype=dtype)
    if device == "cuda" and importlib.util.find_spec("accelerate") is not None:
        common["device_map"] = device  # weights go straight to the GPU
    where = f"features.model_id={model_id!r} (revision {cfg.revision!r}, " + (
        "local cache/path only)" if cfg.local_files_only else "hub)")
    try:
        model_type = AutoConfig.from_pretrained(model_id, **files).model_type
        if model_type not in (family.thinker_model_type, family.full_model_type):
            raise ModelLoadError(
                f"{where}: model_type {model_type!r} is not of the {family.name} family that "
                f"features.backbone={name!r} loads; expected {family.thinker_model_type!r} or {family.full_model_type!r}"
            )
        processor = processor_cls.from_pretrained(model_id, **files)
        # a full checkpoint: the thinker class reads its thinker config and thinker.* weights only
        model = thinker_cls.from_pretrained(model_id, **common)
    except (OSError, ValueError) as e:  # missing files; a path that is no repo id
        why = " ".join(str(e).split()).rstrip(".")
        raise ModelLoadError(
            f"{where}: cannot load the {family.name} thinker or processor: {why}. "
            f"Expected a downloaded checkpoint or a local directory."
        ) from None
    if getattr(model.config, "vision_start_token_id", None) is None:  # the audio-in-video rope index reads it
        model.config.vision_start_token_id = processor.tokenizer.convert_tokens_to_ids(processor.vision_bos_token)
    model.to(device).eval().requires_grad_(False)
    return Backbone.from_loaded(name, model, processor, family=family.name)
