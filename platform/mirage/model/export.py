"""Exported model: the unit that ensembles and serving consume.

A directory holding ``model.safetensors`` (our module names, full state dict, float32),
``config.yaml`` (the resolved :class:`~mirage.config.Config`) and ``meta.json``
(``feature_dims``, ``n_parcels``, ``n_subjects``, ``n_output_trs``, ``subjects``,
``feature_key``, ``layers``). Written to a temporary sibling and renamed into place, so
a reader never sees a half-written export. Loading reads tensors with safetensors only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mirage.atomic import replacing_dir
from mirage.config import Config, ConfigError, load_config
from mirage.documents import read_mapping
from mirage.errors import ModelLoadError
from mirage.model.network import MirageModel, build_model

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
META = "meta.json"
SIZE_KEYS = ("feature_dims", "n_parcels", "n_subjects", "n_output_trs")


def _full_state_dict(model: MirageModel | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """float32, contiguous, unshared CPU tensors (DTensor shards are gathered)."""
    sd = model.state_dict() if isinstance(model, torch.nn.Module) else dict(model)
    out = {}
    for k, v in sd.items():
        if hasattr(v, "full_tensor"):  # FSDP2 DTensor: every rank must take part
            v = v.full_tensor()
        out[k] = v.detach().to("cpu", torch.float32).contiguous().clone()
    return out


def export_meta(model: MirageModel | Mapping[str, Tensor], cfg: Config, meta: Mapping[str, Any]) -> dict[str, Any]:
    """``meta`` completed with the model's sizes and the config's subjects and layers.

    Sizes given in ``meta`` must agree with the model; ``meta['feature_dims']`` may list
    more modalities than the model uses.
    """
    out = _jsonable(dict(meta))
    if isinstance(model, MirageModel):
        dims = dict(out.get("feature_dims", {}))
        for m, d in model.feature_dims.items():
            if dims.setdefault(m, list(d)) != list(d):
                raise ValueError(f"meta['feature_dims'][{m!r}]={dims[m]} disagrees with the model ({list(d)})")
        out["feature_dims"] = dims
        for k in ("n_parcels", "n_subjects", "n_output_trs"):
            v = getattr(model, k)
            if out.setdefault(k, v) != v:
                raise ValueError(f"meta[{k!r}]={out[k]!r} disagrees with the model ({v!r})")
    missing = [k for k in SIZE_KEYS if k not in out]
    if missing:
        raise ValueError(f"meta: missing {missing} (needed to rebuild the model from a state dict)")
    out.setdefault("subjects", list(cfg.data.subjects))
    out.setdefault("layers", cfg.model.layers)
    out.setdefault("feature_key", None)
    return out


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x))


def save_exported(
    directory: str | os.PathLike,
    model: MirageModel | Mapping[str, Tensor],
    cfg: Config,
    meta: Mapping[str, Any],
) -> Path:
    """Write an exported model to ``directory`` atomically (replacing an existing one).

    Args:
        directory: target folder.
        model: the model, or its full state dict (then ``meta`` must hold the sizes).
        cfg: the resolved config of the run.
        meta: ``feature_key`` and anything else to record; sizes, subjects and layers are filled in.
    """
    from safetensors.torch import save_file

    target = Path(directory)
    full_meta = export_meta(model, cfg, meta)
    with replacing_dir(target) as tmp:
        save_file(_full_state_dict(model), str(tmp / WEIGHTS), metadata={"format": "pt"})
        cfg.dump(tmp / CONFIG)
        (tmp / META).write_text(json.dumps(full_meta, indent=2))
    return target


def read_exported_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """``meta.json`` of an exported model, validated."""
    path = Path(directory) / META
    meta = read_mapping(path, ModelLoadError, f"{directory}: not an exported model ({META} missing)")
    missing = [k for k in SIZE_KEYS if k not in meta]
    if missing:
        raise ModelLoadError(f"{path}: missing fields {missing}")
    dims = meta["feature_dims"]
    if not isinstance(dims, dict) or not all(isinstance(v, list) and len(v) == 2 for v in dims.values()):
        raise ModelLoadError(f"{path}: feature_dims must map modality -> [n_layers, dim], got {dims!r}")
    return meta


def load_exported(directory: str | os.PathLike) -> tuple[MirageModel, Config, dict[str, Any]]:
    """Rebuild an exported model: ``(model in eval mode, resolved config, meta)``."""
    from safetensors.torch import load_file

    root = Path(directory)
    for name in (WEIGHTS, CONFIG):
        if not (root / name).is_file():
            raise ModelLoadError(f"{root}: not an exported model ({name} missing)")
    meta = read_exported_meta(root)
    try:
        cfg = load_config(str(root / CONFIG))
    except ConfigError as e:
        raise ModelLoadError(f"{root / CONFIG}: {e}") from None
    model = build_model(
        cfg.model,
        {m: tuple(d) for m, d in meta["feature_dims"].items()},
        int(meta["n_parcels"]),
        int(meta["n_subjects"]),
        int(meta["n_output_trs"]),
    )
    try:
        sd = load_file(str(root / WEIGHTS))
    except Exception as e:
        raise ModelLoadError(f"{root / WEIGHTS}: not a readable safetensors file ({e})") from None
    ours = model.state_dict()
    for key in ours:
        if key not in sd:
            raise ModelLoadError(f"{root / WEIGHTS}: missing key {key!r}")
        if sd[key].shape != ours[key].shape:
            raise ModelLoadError(
                f"{root / WEIGHTS}: {key} has shape {tuple(sd[key].shape)}, expected {tuple(ours[key].shape)}"
            )
    extra = sorted(set(sd) - set(ours))
    if extra:
        raise ModelLoadError(f"{root / WEIGHTS}: unexpected keys {extra[:5]}")
    model.load_state_dict(sd, strict=True)
    return model.eval(), cfg, meta
