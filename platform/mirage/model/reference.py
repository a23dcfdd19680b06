"""Load checkpoints in the reference (published) format into :class:`MirageModel`.

The published checkpoint is a ``model.safetensors`` whose keys are the reference module
names, next to the reference trainer's ``config.yaml``. Our modules keep those names
except in the brain encoder, whose flat sub-layer list ``encoder.layers.{2k|2k+1}`` is
grouped into blocks here; :func:`reference_to_mirage_key` is the whole map.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mirage.config import FUSION_ORDER, ModelConfig
from mirage.documents import read_mapping
from mirage.errors import ModelLoadError
from mirage.model.network import MirageModel, build_model

ROTARY_BUFFER = "temporal_encoder.encoder.rotary_pos_emb.inv_freq"

_SUBLAYER = re.compile(r"^temporal_encoder\.encoder\.layers\.(\d+)\.(.+)$")
_ATTN_PARTS = {"0.0.g": "attn_norm.g", "2.residual_scale": "attn_residual_scale"}
_FF_PARTS = {
    "0.0.g": "ff_norm.g",
    "1.ff.0.0.weight": "ff.fc1.weight",
    "1.ff.0.0.bias": "ff.fc1.bias",
    "1.ff.2.weight": "ff.fc2.weight",
    "1.ff.2.bias": "ff.fc2.bias",
    "2.residual_scale": "ff_residual_scale",
}


def reference_to_mirage_key(key: str) -> str | None:
    """Our name for a reference state-dict key (None for the rotary buffer, which we recompute)."""
    if key == ROTARY_BUFFER:
        return None
    if key == "temporal_encoder.encoder.final_norm.g":
        return "temporal_encoder.final_norm.g"
    m = re.fullmatch(r"projectors\.(\w+)\.net\.(weight|bias)", key)
    if m:
        return f"projectors.{m[1]}.{m[2]}"
    m = _SUBLAYER.match(key)
    if m:
        i, rest = int(m[1]), m[2]
        block = f"temporal_encoder.blocks.{i // 2}."
        if i % 2 == 0:
            if rest in _ATTN_PARTS:
                return block + _ATTN_PARTS[rest]
            if re.fullmatch(r"1\.to_(q|k|v|out)\.weight", rest):
                return block + "attn." + rest[2:]
        elif rest in _FF_PARTS:
            return block + _FF_PARTS[rest]
        return key  # unknown sub-layer part: reported as unexpected
    return key


def mirage_to_reference_key(key: str) -> str:
    """Inverse of :func:`reference_to_mirage_key`."""
    if key == "temporal_encoder.final_norm.g":
        return "temporal_encoder.encoder.final_norm.g"
    m = re.fullmatch(r"projectors\.(\w+)\.(weight|bias)", key)
    if m:
        return f"projectors.{m[1]}.net.{m[2]}"
    m = re.fullmatch(r"temporal_encoder\.blocks\.(\d+)\.(.+)", key)
    if m:
        k, rest = int(m[1]), m[2]
        if rest.startswith("attn."):
            return f"temporal_encoder.encoder.layers.{2 * k}.1.{rest[5:]}"
        for parts, offset in ((_ATTN_PARTS, 0), (_FF_PARTS, 1)):
            for ref, ours in parts.items():
                if ours == rest:
                    return f"temporal_encoder.encoder.layers.{2 * k + offset}.{ref}"
    return key


def to_reference_state_dict(model: MirageModel) -> dict[str, Tensor]:
    """Our state dict under the reference names (plus the rotary buffer), as the published file."""
    sd = {mirage_to_reference_key(k): v for k, v in model.state_dict().items()}
    sd[ROTARY_BUFFER] = model.temporal_encoder.rotary.inv_freq()
    return sd


# ----------------------------------------------------------------- reading inputs


def read_reference_weights(weights: str | os.PathLike | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A reference state dict from a ``.safetensors`` file, a Lightning ``.ckpt`` or a mapping.

    A ``model.`` prefix (Lightning module attribute) is stripped.
    """
    if isinstance(weights, Mapping):
        sd = dict(weights)
        where = "state dict"
    else:
        path = Path(weights)
        where = str(path)
        if not path.is_file():
            raise ModelLoadError(f"{path}: weights file not found (expected model.safetensors or a .ckpt)")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            try:
                sd = load_file(str(path))
            except Exception as e:  # corrupt or truncated file
                raise ModelLoadError(f"{path}: not a readable safetensors file ({e})") from None
        else:
            try:
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise ModelLoadError(
                    f"{path}: cannot be read with weights_only=True ({type(e).__name__}); "
                    "expected a safetensors file or a checkpoint holding only tensors"
                ) from None
            sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
            if not isinstance(sd, dict):
                raise ModelLoadError(f"{path}: expected a dict with a 'state_dict' of tensors")
    bad = [k for k, v in sd.items() if not isinstance(v, Tensor)]
    if bad:
        raise ModelLoadError(f"{where}: entries {bad[:3]} are not tensors")
    if sd and all(k.startswith("model.") for k in sd):
        sd = {k[len("model."):]: v for k, v in sd.items()}
    return sd


def _section(tree: dict[str, Any], name: str, path: Path) -> dict[str, Any]:
    node = tree.get(name)
    if not isinstance(node, dict):
        raise ModelLoadError(f"{path}: missing section {name!r} of a reference config.yaml")
    return node


def _field(node: dict[str, Any], key: str, where: str, path: Path) -> Any:
    if key not in node:
        raise ModelLoadError(f"{path}: missing field {where}.{key}")
    return node[key]


def _expect(value: Any, allowed: tuple[Any, ...], where: str, path: Path) -> None:
    if value not in allowed:
        raise ModelLoadError(f"{path}: {where}={value!r} is not supported (expected one of {list(allowed)})")


def _weight(sd: Mapping[str, Tensor], key: str, ndim: int) -> Tensor:
    if key not in sd:
        raise ModelLoadError(f"reference weights: missing key {key!r}")
    if sd[key].ndim != ndim:
        raise ModelLoadError(f"reference weights: {key} has shape {tuple(sd[key].shape)}, expected {ndim} dims")
    return sd[key]


def reference_model_args(
    config_yaml: str | os.PathLike, state_dict: Mapping[str, Tensor]
) -> tuple[ModelConfig, dict[str, tuple[int, int]], int, int, int]:
    """``(cfg.model, feature_dims, n_parcels, n_subjects, n_output_trs)`` of a reference run.

    Architecture numbers come from ``model.*``, ``modality_stack.*`` and ``readout.*`` of
    the reference ``config.yaml``; the feature dim, query count, parcels and subjects from
    the weights (``n_layers`` is unknown: reported as 0).
    """
    path = Path(config_yaml)
    tree = read_mapping(path, ModelLoadError, f"{path}: reference config.yaml not found")
    model, stack, readout = (_section(tree, s, path) for s in ("model", "modality_stack", "readout"))

    modalities = [m for m in FUSION_ORDER if f"layer_poolers.{m}.query_tokens" in state_dict]
    if not modalities:
        raise ModelLoadError(f"reference weights: no key layer_poolers.<{'|'.join(FUSION_ORDER)}>.query_tokens")
    declared = tree.get("data", {}).get("modalities") if isinstance(tree.get("data"), dict) else None
    if declared is not None and set(declared) != set(modalities):
        raise ModelLoadError(f"{path}: data.modalities={declared} but the weights hold poolers for {modalities}")

    poolers = []
    for m in modalities:
        node = _section(stack, m, path)
        where = f"modality_stack.{m}"
        _expect(node.get("kind"), ("layer_cross_attn",), f"{where}.kind", path)
        _expect(node.get("query_output", "concat"), ("concat",), f"{where}.query_output", path)
        _expect(node.get("depth", 1), (1,), f"{where}.depth", path)
        _expect(node.get("layer_pos_embedding", "none"), ("none", None), f"{where}.layer_pos_embedding", path)
        queries = _weight(state_dict, f"layer_poolers.{m}.query_tokens", 2)
        n_queries = int(_field(node, "n_queries", where, path))
        if queries.shape[0] != n_queries:
            raise ModelLoadError(
                f"{path}: {where}.n_queries={n_queries} but layer_poolers.{m}.query_tokens has {queries.shape[0]} rows"
            )
        poolers.append((int(node["heads"]), n_queries, float(node.get("attn_dropout", 0.0))))
    if len(set(poolers)) != 1:
        raise ModelLoadError(f"{path}: modality_stack poolers differ between modalities {poolers}; expected equal")
    pooler_heads, n_queries, pooler_dropout = poolers[0]
    _expect(_section(stack, "fusion", path).get("kind"), ("cat",), "modality_stack.fusion.kind", path)

    reducer = _section(readout, "temporal_reducer", path)
    head = _section(readout, "head", path)
    _expect(reducer.get("kind"), ("adaptive_avg",), "readout.temporal_reducer.kind", path)
    _expect(reducer.get("location", "post_head"), ("post_head",), "readout.temporal_reducer.location", path)
    _expect(head.get("kind"), ("subject_linear",), "readout.head.kind", path)
    _expect(head.get("bias", True), (True,), "readout.head.bias", path)
    _expect(model.get("projector_kind", "linear"), ("linear",), "model.projector_kind", path)
    _expect(model.get("subject_embedding", False), (False,), "model.subject_embedding", path)
    n_output_trs = reducer.get("n_output_timesteps") or _field(model, "n_output_timesteps", "model", path)

    head_w = _weight(state_dict, "head.weights", 3)
    n_subjects, _, n_parcels = head_w.shape
    declared_subjects = model.get("n_subjects")
    if declared_subjects is not None and int(declared_subjects) != n_subjects:
        raise ModelLoadError(
            f"{path}: model.n_subjects={declared_subjects} but head.weights holds {n_subjects} subjects"
        )
    time_table = _weight(state_dict, "temporal_encoder.time_pos_embed", 3)

    cfg = ModelConfig(
        modalities=modalities,
        n_queries=n_queries,
        pooler_heads=pooler_heads,
        pooler_dropout=pooler_dropout,
        hidden_dim=int(_field(model, "hidden_dim", "model", path)),
        modality_dropout=float(model.get("modality_dropout", 0.0)),
        depth=int(_field(model, "depth", "model", path)),
        heads=int(_field(model, "heads", "model", path)),
        ff_mult=int(_field(model, "ff_mult", "model", path)),
        attn_dropout=float(model.get("attn_dropout", 0.0)),
        ff_dropout=float(model.get("ff_dropout", 0.0)),
        max_time_len=int(time_table.shape[1]),
    )
    dims = {m: (0, int(state_dict[f"layer_poolers.{m}.query_tokens"].shape[1])) for m in modalities}
    return cfg, dims, int(n_parcels), int(n_subjects), int(n_output_trs)


# ----------------------------------------------------------------------- loading


def load_reference_state(model: MirageModel, state_dict: Mapping[str, Tensor]) -> None:
    """Copy a reference-named state dict into ``model`` (strict: every key, every shape)."""
    ours = model.state_dict()
    mapped: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        name = reference_to_mirage_key(key)
        if name is None:
            _check_rotary(model, value)
            continue
        if name not in ours:
            raise ModelLoadError(f"reference weights: unexpected key {key!r} (no such parameter in the model)")
        if tuple(value.shape) != tuple(ours[name].shape):
            raise ModelLoadError(
                f"reference weights: {key} has shape {tuple(value.shape)}, expected {tuple(ours[name].shape)}"
            )
        mapped[name] = value
    missing = [mirage_to_reference_key(k) for k in ours if k not in mapped]
    if missing:
        raise ModelLoadError(f"reference weights: missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    model.load_state_dict(mapped, strict=True)
    gains = torch.cat([v.flatten() for k, v in mapped.items() if k.endswith(".g")])
    if gains.numel() and float(gains.abs().median()) > 0.5:
        warnings.warn(
            "ScaleNorm gains g are near 1: the checkpoint may come from x-transformers <= 1.30, where the "
            "gain is g rather than 1 + g; predictions would then be wrong",
            stacklevel=3,
        )


def _check_rotary(model: MirageModel, inv_freq: Tensor) -> None:
    ours = model.temporal_encoder.rotary.inv_freq()
    if inv_freq.shape != ours.shape or not torch.allclose(inv_freq.float().cpu(), ours, rtol=1e-5):
        raise ModelLoadError(
            f"reference weights: {ROTARY_BUFFER} has shape {tuple(inv_freq.shape)}, expected {tuple(ours.shape)} "
            "(rotary on dim_head // 2 channels; checkpoints of x-transformers < 1.42 used max(dim_head // 2, 32))"
        )


def load_reference(
    weights: str | os.PathLike | Mapping[str, Tensor], config_yaml: str | os.PathLike
) -> MirageModel:
    """Build our model from a reference run and load its weights; returned in eval mode.

    Args:
        weights: ``model.safetensors`` (published), a Lightning ``.ckpt`` or a state dict.
        config_yaml: the reference trainer's ``config.yaml``.
    """
    sd = read_reference_weights(weights)
    cfg, dims, n_parcels, n_subjects, n_output_trs = reference_model_args(config_yaml, sd)
    model = build_model(cfg, dims, n_parcels, n_subjects, n_output_trs)
    load_reference_state(model, sd)
    return model.eval()
