"""Architecture, shapes and modality handling of the MIRAGE model (tiny sizes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mirage.config import ConfigError, ModelConfig, load_config
from mirage.model import build_model, select_layers
from mirage.model.encoder import EncoderBlock

MODALITIES = ("text", "audio", "vision")
TINY = ModelConfig(
    n_queries=3, pooler_heads=2, hidden_dim=24, depth=2, heads=2, ff_mult=2, max_time_len=64, modality_dropout=0.5
)
DIMS = {"text": (5, 8), "audio": (4, 12), "vision": (6, 16)}


def tiny_model(cfg: ModelConfig = TINY, n_out: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(cfg, DIMS, n_parcels=7, n_subjects=4, n_output_trs=n_out)


def inputs(B: int = 2, T: int = 12, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    feats = {m: torch.randn(B, L, T, D, generator=g) for m, (L, D) in DIMS.items()}
    return feats, torch.arange(B) % 4


def test_paper_config_parameter_count():
    """The paper preset on the meta device: the published ~1.07 B model.

    Exact count with 3 modalities of (49 layers, 2048), 1000 parcels, 4 subjects, 100 TRs:
      layer poolers   3 x (24*2048 queries + 2 LayerNorms 4*2048 + MHA 4*2048^2 + 4*2048) =  50,528,256
      projections     3 x (24*2048*1024 + 1024)                                            = 150,998,016
      time table      1024 * 3072                                                          =   3,145,728
      8 blocks        8 x (4*3072^2 + 2*3072*12288 + 12288 + 3072 + 2*3072 + 2)            = 906,141,712
      final norm      1
      subject heads   4 * 3072 * 1000 + 4 * 1000                                           =  12,292,000
      total 1,123,105,713 = 1071.1 * 2**20, the "1.07 B" quoted (counted in units of 2**20).
    """
    cfg = load_config("paper")
    with torch.device("meta"):
        model = build_model(
            cfg.model,
            {m: (49, 2048) for m in cfg.model.modalities},
            n_parcels=cfg.data.n_parcels,
            n_subjects=len(cfg.data.subjects),
            n_output_trs=cfg.data.window_trs,
        )
    n = sum(p.numel() for p in model.parameters())
    print(f"paper model: {n:,} parameters = {n / 2**20:.1f} Mi")
    assert n == 1_123_105_713
    assert round(n / 2**20 / 1000, 2) == 1.07
    assert all(p.is_meta for p in model.parameters())
    assert len(model.encoder_blocks()) == 8
    assert model.temporal_encoder.blocks[0].attn.to_q.weight.shape == (3072, 3072)
    assert model.head.weights.shape == (4, 3072, 1000)


@pytest.mark.parametrize("T, n_out", [(12, 4), (17, 6), (13, 5), (7, 7), (5, 8)])
def test_shapes_and_adaptive_pooling(T, n_out):
    model = tiny_model(n_out=n_out).eval()
    feats, sid = inputs(T=T)
    with torch.no_grad():
        pooled = model(feats, sid)
        frames = model(feats, sid, pool_outputs=False)
    assert pooled.shape == (2, n_out, 7) and frames.shape == (2, T, 7)
    # window i averages frames [floor(i*T/n), ceil((i+1)*T/n)): uneven and overlapping for odd ratios
    for i in range(n_out):
        lo, hi = (i * T) // n_out, -((-(i + 1) * T) // n_out)
        assert torch.allclose(pooled[:, i], frames[:, lo:hi].mean(1), atol=1e-6)


def test_subject_heads_are_separate():
    model = tiny_model().eval()
    feats, _ = inputs(B=1)
    with torch.no_grad():
        preds = [model(feats, torch.tensor([s])) for s in range(4)]
        model.head.weights[2].zero_()
        model.head.bias_param[2].fill_(0.5)
        after = [model(feats, torch.tensor([s])) for s in range(4)]
    assert not torch.allclose(preds[0], preds[1])
    assert torch.equal(after[0], preds[0]) and torch.equal(after[3], preds[3])
    assert torch.allclose(after[2], torch.full_like(after[2], 0.5))


def test_drop_zeroes_a_modality():
    model = tiny_model().eval()
    feats, sid = inputs()
    with torch.no_grad():
        full = model(feats, sid)
        dropped = model.trace(feats, sid, drop=["audio"])
        without = model({m: x for m, x in feats.items() if m != "audio"}, sid, drop=("audio",))
        changed = model(dict(feats, audio=feats["audio"] * 3), sid, drop=("audio",))
    proj = model.projectors["audio"].out_features
    assert torch.equal(dropped["fused"][..., proj : 2 * proj], torch.zeros(2, 12, proj))
    assert not torch.allclose(dropped["fused"][..., :proj], torch.zeros(()))
    assert torch.equal(without, dropped["prediction"]) and torch.equal(changed, without)
    assert not torch.allclose(full, without)
    with pytest.raises(ValueError, match="removes every modality"):
        model(feats, sid, drop=MODALITIES)
    with pytest.raises(ValueError, match="unknown modalities"):
        model(feats, sid, drop=["smell"])
    with pytest.raises(ValueError, match=r"missing modalities \['vision'\]"):
        model({"text": feats["text"], "audio": feats["audio"]}, sid)


def test_modality_dropout_keeps_one_and_is_off_in_eval():
    model = tiny_model(TINY.model_copy(update={"modality_dropout": 0.9, "modality_dropout_per": "sample"}))
    feats, sid = inputs(B=64)
    torch.manual_seed(0)
    masks = torch.stack([model._keep_mask(list(MODALITIES), 64, torch.device("cpu")) for _ in range(20)])
    assert masks.any(-1).all(), "every sample keeps at least one modality"
    assert (masks.sum(-1) == 1).float().mean() > 0.5, "with p=0.9 most samples keep exactly one"
    assert masks.float().mean(dim=(0, 1)).min() > 0.2, "each modality is kept sometimes"
    # the forward applies the mask: with p=0.9 some sample loses text, others keep it
    model.train()
    fused = model.trace(feats, sid)["fused"]
    proj = model.projectors["text"].out_features
    zero_text = (fused[..., :proj] == 0).all(-1).all(-1)  # (B,)
    assert zero_text.any() and not zero_text.all()
    # a modality excluded with drop is never the one rescued
    masks = torch.stack([model._keep_mask(["text"], 64, torch.device("cpu")) for _ in range(5)])
    assert masks[..., 0].all() and not masks[..., 1:].any()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(feats, sid), model(feats, sid))
        fused = model.trace(feats, sid)["fused"]
    assert not (fused == 0).all(-1).any()


def test_training_step_reaches_every_parameter():
    model = tiny_model(TINY.model_copy(update={"modality_dropout": 0.0})).train()
    feats, sid = inputs(B=4)
    model(feats, torch.arange(4)).square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_layer_attention_shapes_and_encoder_blocks():
    model = tiny_model().eval()
    feats, _ = inputs()
    with torch.no_grad():
        maps = model.layer_attention(feats)
    for m, (L, _) in DIMS.items():
        assert maps[m].shape == (2, 12, 2, 3, L)
        assert torch.allclose(maps[m].sum(-1), torch.ones(()), atol=1e-6)
    blocks = model.encoder_blocks()
    assert len(blocks) == 2 and all(isinstance(b, EncoderBlock) for b in blocks)
    assert model.layer_poolers["text"].last_attention_weights is None


def test_order_of_feature_dict_does_not_matter():
    model = tiny_model().eval()
    feats, sid = inputs()
    with torch.no_grad():
        a = model(feats, sid)
        b = model({m: feats[m] for m in reversed(list(feats))}, sid)
        c = model({m: x.half() for m, x in feats.items()}, sid)
    assert torch.equal(a, b)
    assert torch.allclose(a, c, atol=1e-2)


def test_bad_sizes_are_config_errors():
    with pytest.raises(ConfigError, match="model.heads=5"):
        build_model(TINY.model_copy(update={"heads": 5}), DIMS, 7, 4, 4)
    with pytest.raises(ConfigError, match="model.pooler_heads=3"):
        build_model(TINY.model_copy(update={"pooler_heads": 3}), DIMS, 7, 4, 4)
    with pytest.raises(ConfigError, match=r"no feature dims for \['vision'\]"):
        build_model(TINY, {"text": (5, 8), "audio": (4, 12)}, 7, 4, 4)
    with pytest.raises(ConfigError, match="model.layers"):
        load_config("demo", ["model.layers=[1, 1]"])
    model = tiny_model()
    feats, sid = inputs(T=65)
    with pytest.raises(ValueError, match="max_time_len=64"):
        model(feats, sid)


def test_select_layers_on_tensors_and_store_arrays():
    x = torch.arange(2 * 5 * 3 * 4).reshape(2, 5, 3, 4)
    assert torch.equal(select_layers(x, [0, 4, -1]), x[:, [0, 4, 4]])
    assert select_layers(x, None) is x
    stored = np.arange(3 * 3 * 5 * 2).reshape(3, 3, 5, 2)  # (n_frames, 3, n_layers, dim)
    assert np.array_equal(select_layers(stored, [1, 3], axis=2), stored[:, :, [1, 3]])
    with pytest.raises(ConfigError, match=r"model.layers: indices \[5\]"):
        select_layers(x, [5])


def test_subset_of_modalities():
    cfg = TINY.model_copy(update={"modalities": ["vision", "text"], "hidden_dim": 25, "heads": 2})
    model = build_model(cfg, DIMS, 7, 4, 4).eval()
    assert model.dim == 24  # (25 // 2) * 2, as the reference's fused width
    feats, sid = inputs()
    with torch.no_grad():
        out = model(feats, sid)
    assert out.shape == (2, 4, 7) and set(model.layer_poolers) == {"vision", "text"}
