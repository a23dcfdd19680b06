"""Our model against the reference implementation's outputs (../shared/conformance)."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from mirage.errors import ModelLoadError
from mirage.model import load_reference, to_reference_state_dict
from mirage.model.reference import ROTARY_BUFFER

MODALITIES = ("text", "audio", "vision")
FIXTURES = ("tiny_a", "tiny_b")


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max(1, max |ref|), the README's tolerance rule."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return ((ours.double() - ref.double()).abs().max() / max(1.0, ref.abs().max().item())).item()


def load_case(root, name):
    d = root / name
    inputs = load_file(str(d / "inputs.safetensors"))
    outputs = load_file(str(d / "outputs.safetensors"))
    features = {m: inputs[f"features_{m}"] for m in MODALITIES}
    return d, features, inputs["subject_id"], outputs


@pytest.mark.parametrize("name", FIXTURES)
def test_prediction_and_stages_match_reference(conformance_dir, name):
    d, features, subject_id, ref = load_case(conformance_dir, name)
    model = load_reference(d / "model.safetensors", d / "config.yaml")
    assert not model.training
    with torch.no_grad():
        stages = model.trace(features, subject_id)
        unpooled = model(features, subject_id, pool_outputs=False)
    errors = {"prediction": rel_err(stages["prediction"], ref["prediction"])}
    errors["prediction_unpooled"] = rel_err(unpooled, ref["prediction_unpooled"])
    for m in MODALITIES:
        errors[f"pooled_{m}"] = rel_err(stages[f"pooled_{m}"], ref[f"intermediate_pooled_{m}"])
        errors[f"projected_{m}"] = rel_err(stages[f"projected_{m}"], ref[f"intermediate_projected_{m}"])
    for s in ("fused", "temporal", "head"):
        errors[s] = rel_err(stages[s], ref[f"intermediate_{s}"])
    print(name, {k: f"{v:.1e}" for k, v in errors.items()})
    assert max(errors.values()) <= 1e-5, errors


@pytest.mark.parametrize("name", FIXTURES)
def test_layer_attention_matches_reference(conformance_dir, name):
    d, features, subject_id, ref = load_case(conformance_dir, name)
    model = load_reference(d / "model.safetensors", d / "config.yaml")
    with torch.no_grad():
        maps = model.layer_attention(features)
        for m in MODALITIES:
            model.layer_poolers[m].record_attention = True
        recorded = model(features, subject_id)
    assert rel_err(recorded, ref["prediction_record_attention"]) <= 1e-5
    for m in MODALITIES:
        B, L, T, _ = features[m].shape
        pooler = model.layer_poolers[m]
        assert maps[m].shape == (B, T, pooler.attn.num_heads, pooler.n_queries, L)
        assert torch.allclose(maps[m].sum(-1), torch.ones(()), atol=1e-5)
        assert rel_err(maps[m].flatten(0, 1), ref[f"attention_{m}"]) <= 1e-5
        assert rel_err(pooler.last_attention_weights, ref[f"attention_{m}"]) <= 1e-5


@pytest.mark.parametrize("name", FIXTURES)
def test_float64_matches_reference(conformance_dir, name):
    d, features, subject_id, ref = load_case(conformance_dir, name)
    model = load_reference(d / "model.safetensors", d / "config.yaml").double()
    with torch.no_grad():
        pred = model({m: x.double() for m, x in features.items()}, subject_id)
    assert pred.dtype == torch.float64
    err = (pred - ref["prediction_float64"]).abs().max().item()
    print(name, f"float64 max abs err {err:.1e}")
    assert err <= 1e-7


def test_state_dict_file_and_lightning_prefix_load_identically(conformance_dir, tmp_path):
    d, features, subject_id, ref = load_case(conformance_dir, "tiny_b")
    sd = load_file(str(d / "state_dict.safetensors"))
    ckpt = tmp_path / "best.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 3}, ckpt)
    with torch.no_grad():
        from_dict = load_reference(sd, d / "config.yaml")(features, subject_id)
        from_ckpt = load_reference(ckpt, d / "config.yaml")(features, subject_id)
    assert torch.equal(from_dict, from_ckpt)
    assert rel_err(from_ckpt, ref["prediction"]) <= 1e-5


def test_reference_names_round_trip(conformance_dir):
    d = conformance_dir / "tiny_a"
    sd = load_file(str(d / "state_dict.safetensors"))
    back = to_reference_state_dict(load_reference(sd, d / "config.yaml"))
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_mismatched_weights_name_the_key(conformance_dir, tmp_path):
    d = conformance_dir / "tiny_a"
    sd = load_file(str(d / "state_dict.safetensors"))
    cfg = d / "config.yaml"

    missing = {k: v for k, v in sd.items() if k != "temporal_encoder.encoder.layers.1.1.ff.2.bias"}
    with pytest.raises(ModelLoadError, match=r"layers\.1\.1\.ff\.2\.bias"):
        load_reference(missing, cfg)

    extra = dict(sd, **{"temporal_encoder.encoder.layers.9.0.0.g": torch.zeros(1)})
    with pytest.raises(ModelLoadError, match=r"unexpected key 'temporal_encoder\.encoder\.layers\.9\.0\.0\.g'"):
        load_reference(extra, cfg)

    wrong = dict(sd, **{"projectors.audio.net.bias": torch.zeros(17)})
    with pytest.raises(ModelLoadError, match=r"projectors\.audio\.net\.bias has shape \(17,\), expected \(16,\)"):
        load_reference(wrong, cfg)

    old_rotary = dict(sd, **{ROTARY_BUFFER: torch.ones(16)})
    with pytest.raises(ModelLoadError, match="inv_freq"):
        load_reference(old_rotary, cfg)

    bad_cfg = tmp_path / "config.yaml"
    bad_cfg.write_text(cfg.read_text().replace("kind: cat", "kind: self_attn", 1))
    with pytest.raises(ModelLoadError, match="modality_stack.fusion.kind"):
        load_reference(sd, bad_cfg)

    truncated = tmp_path / "model.safetensors"
    truncated.write_bytes((d / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        load_reference(truncated, cfg)


def test_old_scalenorm_convention_warns(conformance_dir):
    d = conformance_dir / "tiny_b"
    sd = load_file(str(d / "state_dict.safetensors"))
    old = {k: (v + 1 if k.endswith(".g") else v) for k, v in sd.items()}
    with pytest.warns(UserWarning, match="x-transformers <= 1.30"):
        load_reference(old, d / "config.yaml")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_reference(sd, d / "config.yaml")


def test_written_reference_file_loads(conformance_dir, tmp_path):
    d, features, subject_id, ref = load_case(conformance_dir, "tiny_a")
    model = load_reference(d / "model.safetensors", d / "config.yaml")
    save_file(to_reference_state_dict(model), str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    again = load_reference(tmp_path / "model.safetensors", d / "config.yaml")
    with torch.no_grad():
        assert torch.equal(again(features, subject_id), model(features, subject_id))
