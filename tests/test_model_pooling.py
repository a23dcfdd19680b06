"""Layer pooling variants (model.layer_pool): each learns, keeps the downstream shapes, and round-trips."""

from __future__ import annotations

import pytest
import torch
import yaml

from mirage.config import ConfigError, load_config
from mirage.errors import MirageError
from mirage.model import build_model, load_exported, save_exported

DIMS = {"text": (5, 8), "audio": (4, 8), "vision": (6, 8)}
POOLS = ("cross_attention", "mean", "concat", "self_attention")
N_PARCELS, T, TRS = 6, 10, 5


def _cfg(tmp_path, pool: str, *extra: str):
    return load_config(
        "demo",
        [f"model.layer_pool={pool}", "model.n_queries=2", "model.pooler_heads=2", "model.hidden_dim=24",
         "model.depth=1", "model.heads=2", "model.modality_dropout=0", "model.self_attention_tokens=2",
         "data.window_trs=5", f"outputs={tmp_path}", *extra],
    )


def _planted(seed: int = 0):
    """Features whose deepest audio layer drives the parcels linearly; B = 8 windows."""
    g = torch.Generator().manual_seed(seed)
    feats = {m: torch.randn(8, L, T, D, generator=g) for m, (L, D) in DIMS.items()}
    w = torch.randn(DIMS["audio"][1], N_PARCELS, generator=g)
    frames = feats["audio"][:, -1] @ w  # (B, T, P)
    y = torch.nn.functional.adaptive_avg_pool1d(frames.transpose(1, 2), TRS).transpose(1, 2)  # (B, TRS, P)
    return feats, torch.zeros(8, dtype=torch.long), y / y.std()


@pytest.mark.parametrize("pool", POOLS)
def test_each_variant_learns_a_planted_signal(tmp_path, pool):
    cfg = _cfg(tmp_path, pool)
    torch.manual_seed(0)
    model = build_model(cfg.model, DIMS, N_PARCELS, n_subjects=4, n_output_trs=TRS)
    feats, sid, y = _planted()
    out = model(feats, sid)
    assert out.shape == (8, TRS, N_PARCELS)  # every variant feeds the same encoder and heads
    assert all(model.projectors[m].out_features == 8 for m in DIMS)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(40):
        loss = torch.nn.functional.mse_loss(model(feats, sid), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], (pool, losses[0], losses[-1])


@pytest.mark.parametrize("pool", POOLS)
def test_save_load_round_trip_predicts_identically(tmp_path, pool):
    cfg = _cfg(tmp_path, pool)
    torch.manual_seed(1)
    model = build_model(cfg.model, DIMS, N_PARCELS, n_subjects=4, n_output_trs=TRS).eval()
    feats, sid, _ = _planted(2)
    out = save_exported(tmp_path / "export", model, cfg, {"feature_key": "k"})
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["layer_pool"] == pool
    loaded, cfg2, _ = load_exported(out)
    assert cfg2.model.layer_pool == pool
    with torch.no_grad():
        assert torch.equal(loaded(feats, sid), model(feats, sid))


def test_old_saved_model_without_the_field_loads_as_cross_attention(tmp_path):
    cfg = _cfg(tmp_path, "cross_attention")
    torch.manual_seed(3)
    model = build_model(cfg.model, DIMS, N_PARCELS, n_subjects=4, n_output_trs=TRS).eval()
    out = save_exported(tmp_path / "export", model, cfg, {"feature_key": "k"})
    tree = yaml.safe_load((out / "config.yaml").read_text())
    for key in ("layer_pool", "self_attention_tokens", "self_attention_ff_mult"):
        del tree["model"][key]
    (out / "config.yaml").write_text(yaml.safe_dump(tree))
    loaded, cfg2, _ = load_exported(out)
    feats, sid, _ = _planted(4)
    assert cfg2.model.layer_pool == "cross_attention"
    with torch.no_grad():
        assert torch.equal(loaded(feats, sid), model(feats, sid))


@pytest.mark.parametrize("pool", ["mean", "concat", "self_attention"])
def test_layer_attention_only_for_cross_attention(tmp_path, pool):
    feats, _, _ = _planted()
    model = build_model(_cfg(tmp_path, pool).model, DIMS, N_PARCELS, n_subjects=4, n_output_trs=TRS).eval()
    with pytest.raises(MirageError, match="only for model.layer_pool='cross_attention'.*" + pool):
        model.layer_attention(feats)
    ref = build_model(_cfg(tmp_path, "cross_attention").model, DIMS, N_PARCELS, 4, TRS).eval()
    assert ref.layer_attention(feats)["text"].shape == (8, T, 2, 2, 5)


def test_variant_errors_name_the_setting(tmp_path):
    with pytest.raises(ConfigError, match="model.layer_pool; expected one of .*'self_attention'"):
        _cfg(tmp_path, "max")
    concat = build_model(_cfg(tmp_path, "concat").model, DIMS, N_PARCELS, 4, TRS)
    feats, sid, _ = _planted()
    feats["text"] = feats["text"][:, :3]
    with pytest.raises(ValueError, match="concat.*5 layers.*3"):
        concat(feats, sid)
    attn = build_model(_cfg(tmp_path, "self_attention", "model.self_attention_tokens=5").model, DIMS, N_PARCELS, 4, TRS)
    with pytest.raises(ValueError, match="self_attention_tokens=5 exceeds the 4 layers"):
        attn(_planted()[0], sid)
