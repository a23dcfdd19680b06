"""Exported model directories: round trip, atomic replacement, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mirage.config import load_config
from mirage.errors import ModelLoadError
from mirage.model import build_model, load_exported, save_exported

DIMS = {"text": (5, 8), "audio": (4, 12), "vision": (6, 16)}


@pytest.fixture()
def trained(tmp_path):
    cfg = load_config(
        "demo",
        ["model.n_queries=2", "model.pooler_heads=2", "model.hidden_dim=24", "model.depth=1",
         "model.heads=2", "model.layers=[0, 2, -1]", "data.window_trs=5", f"outputs={tmp_path}"],
    )
    torch.manual_seed(0)
    model = build_model(cfg.model, DIMS, n_parcels=7, n_subjects=len(cfg.data.subjects), n_output_trs=5)
    with torch.no_grad():  # move away from the init so a reload that re-initialised would differ
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    feats = {m: torch.randn(2, L, 11, D, generator=g) for m, (L, D) in DIMS.items()}
    return cfg, model.eval(), feats, torch.tensor([3, 1])


def test_round_trip_gives_identical_outputs(tmp_path, trained):
    cfg, model, feats, sid = trained
    out = save_exported(tmp_path / "export", model, cfg, {"feature_key": "tiny-abc123"})
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "meta.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    loaded, cfg2, meta = load_exported(out)
    assert not loaded.training and cfg2 == cfg
    assert meta == {
        "feature_key": "tiny-abc123",
        "feature_dims": {m: list(d) for m, d in DIMS.items()},
        "n_parcels": 7,
        "n_subjects": 4,
        "n_output_trs": 5,
        "subjects": ["sub-01", "sub-02", "sub-03", "sub-05"],
        "layers": [0, 2, -1],
    }
    with torch.no_grad():
        assert torch.equal(loaded(feats, sid), model(feats, sid))
        assert torch.equal(loaded(feats, sid, drop=["text"]), model(feats, sid, drop=["text"]))
    weights = load_file(str(out / "model.safetensors"))
    assert set(weights) == set(model.state_dict()) and all(v.dtype == torch.float32 for v in weights.values())


def test_state_dict_export_and_replacement(tmp_path, trained):
    cfg, model, feats, sid = trained
    target = tmp_path / "export"
    save_exported(target, model, cfg, {"feature_key": "k"})
    with pytest.raises(ValueError, match="missing"):
        save_exported(target, model.state_dict(), cfg, {"feature_key": "k"})
    meta = json.loads((target / "meta.json").read_text())
    sd = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    save_exported(target, sd, cfg, meta)  # replaces the first export in place
    loaded, _, _ = load_exported(target)
    assert all(not v.any() for v in loaded.state_dict().values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_failed_write_leaves_previous_export(tmp_path, trained):
    cfg, model, feats, sid = trained
    target = tmp_path / "export"
    save_exported(target, model, cfg, {"feature_key": "k"})
    meta = json.loads((target / "meta.json").read_text())
    broken = dict(model.state_dict(), **{"head.weights": "not a tensor"})
    with pytest.raises(AttributeError):  # fails half way through writing the new export
        save_exported(target, broken, cfg, dict(meta, feature_key="new"))
    loaded, _, meta = load_exported(target)
    assert meta["feature_key"] == "k"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_broken_exports_name_file_and_key(tmp_path, trained):
    cfg, model, feats, sid = trained
    target = save_exported(tmp_path / "export", model, cfg, {"feature_key": "k"})
    weights = load_file(str(target / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if k != "head.bias_param"}, str(target / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: missing key 'head\.bias_param'"):
        load_exported(target)
    weights["head.weights"] = weights["head.weights"][:, :, :3].contiguous()
    save_file(weights, str(target / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"head\.weights has shape \(4, 24, 3\), expected \(4, 24, 7\)"):
        load_exported(target)
    (target / "meta.json").write_text(json.dumps({"n_parcels": 7}))
    with pytest.raises(ModelLoadError, match=r"meta\.json: missing fields \['feature_dims'"):
        load_exported(target)
    (target / "config.yaml").unlink()
    with pytest.raises(ModelLoadError, match="config.yaml missing"):
        load_exported(target)


def test_meta_must_agree_with_model(tmp_path, trained):
    cfg, model, feats, sid = trained
    with pytest.raises(ValueError, match="n_parcels"):
        save_exported(tmp_path / "a", model, cfg, {"n_parcels": 9})
    dims = {"text": [5, 8], "audio": [4, 12], "vision": [6, 16], "extra": [3, 4]}
    _, _, meta = load_exported(save_exported(tmp_path / "b", model, cfg, {"feature_dims": dims}))
    assert meta["feature_dims"] == dims and meta["feature_key"] is None
    with pytest.raises(ValueError, match=r"feature_dims'\]\['text'\]=\[9, 8\]"):
        save_exported(tmp_path / "c", model, cfg, {"feature_dims": dict(dims, text=[9, 8])})
