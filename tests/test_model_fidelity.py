"""Fidelity options of the model: initialisation rules and how modality dropout is drawn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mirage.config import ModelConfig, load_config
from mirage.model import build_model

MODALITIES = ("text", "audio", "vision")
DIMS = {"text": (5, 8), "audio": (4, 12), "vision": (6, 16)}
TINY = ModelConfig(n_queries=3, pooler_heads=2, hidden_dim=24, depth=1, heads=2, ff_mult=2, max_time_len=64)


def tiny_model(cfg: ModelConfig = TINY, n_parcels: int = 7, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(cfg, DIMS, n_parcels=n_parcels, n_subjects=4, n_output_trs=4)


def inputs(B: int, T: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(B, L, T, D, generator=g) for m, (L, D) in DIMS.items()}, torch.arange(B) % 4


def zeroed_blocks(model, fused: torch.Tensor) -> torch.Tensor:
    """(B, n_modalities) bool: which modality's projected block is all zero in each sample."""
    width = model.projectors[model.modalities[0]].out_features
    blocks = fused.unflatten(-1, (len(model.modalities), width))  # (B, T, M, width)
    return (blocks == 0).all(-1).all(1)  # (B, M)


# ------------------------------------------------------------------ initialisation


@pytest.mark.parametrize("std", [0.02, 1.0])
def test_time_table_follows_its_std(std):
    model = tiny_model(TINY.model_copy(update={"time_init_std": std, "hidden_dim": 96, "max_time_len": 256}))
    table = model.temporal_encoder.time_pos_embed.detach().double().flatten()  # 256 * 96 draws
    assert table.std().item() == pytest.approx(std, rel=0.03)
    assert abs(table.mean().item()) < 4 * std / math.sqrt(table.numel())


def test_head_init_rules_follow_their_distribution():
    P = 600
    normal = tiny_model(TINY.model_copy(update={"head_init": "normal"}), n_parcels=P).head
    uniform = tiny_model(TINY.model_copy(update={"head_init": "uniform"}), n_parcels=P).head
    D = normal.weights.shape[1]
    scale = D**-0.5
    # normal: weights and bias N(0, D^-1/2) (std of a uniform on the same bound would be scale / sqrt(3))
    w, b = normal.weights.detach().double(), normal.bias_param.detach().double()
    assert w.std().item() == pytest.approx(scale, rel=0.03)
    assert b.std().item() == pytest.approx(scale, rel=0.06)
    assert abs(b.mean().item()) < 4 * scale / math.sqrt(b.numel())
    assert w.abs().max().item() > scale  # a normal leaves the uniform's bound
    # uniform: weights inside (-D^-1/2, D^-1/2) with std bound / sqrt(3), bias exactly 0
    w = uniform.weights.detach().double()
    assert w.abs().max().item() <= scale
    assert w.std().item() == pytest.approx(scale / math.sqrt(3), rel=0.03)
    assert torch.count_nonzero(uniform.bias_param) == 0


def test_paper_preset_carries_the_reference_choices():
    cfg = load_config("paper")
    assert cfg.model.time_init_std == 1.0
    assert cfg.model.head_init == "normal"
    assert cfg.model.modality_dropout_per == "batch"
    assert cfg.train.precision == "fp16"
    assert cfg.train.selection_metric == "pooled"
    assert cfg.data.skip_runs == ["s04e01a", "s04e01b", "s04e13b", "s05e20a", "s06e03a"]


# --------------------------------------------------------------- modality dropout


def test_per_batch_dropout_zeroes_the_same_modalities_in_every_sample():
    p = 0.5
    model = tiny_model(TINY.model_copy(update={"modality_dropout": p, "modality_dropout_per": "batch"})).train()
    feats, sid = inputs(B=8)
    torch.manual_seed(0)
    with torch.no_grad():
        zs = torch.stack([zeroed_blocks(model, model.trace(feats, sid)["fused"]) for _ in range(20)])  # (20, B, M)
    assert (zs == zs[:, :1]).all(), "per batch: every sample loses the same modalities"
    assert not zs.all(-1).any(), "at least one modality kept"
    assert zs.any(), "some modality was dropped"
    draws = torch.stack([~model._keep_mask(list(MODALITIES), 8, torch.device("cpu"))[0] for _ in range(3000)])
    assert not draws.all(-1).any()
    dropped = draws.double().mean(0)  # (M,)
    # each of M modalities dropped with p, all-dropped draws rescue one at random: p - p^M / M
    expected = p - p ** len(MODALITIES) / len(MODALITIES)
    assert torch.allclose(dropped, torch.full_like(dropped, expected), atol=0.04), dropped
    masks = torch.stack([model._keep_mask(["text"], 5, torch.device("cpu")) for _ in range(50)])
    assert masks[..., 0].all() and not masks[..., 1:].any(), "a modality excluded with drop is never rescued"


def test_per_sample_dropout_differs_between_samples():
    model = tiny_model(TINY.model_copy(update={"modality_dropout": 0.5, "modality_dropout_per": "sample"})).train()
    feats, sid = inputs(B=8)
    torch.manual_seed(0)
    with torch.no_grad():
        zs = [zeroed_blocks(model, model.trace(feats, sid)["fused"]) for _ in range(20)]
    assert any(not (z == z[:1]).all() for z in zs), "per sample: some batch has samples dropping different modalities"
    assert all((~z).any(-1).all() for z in zs), "every sample keeps at least one modality"


@pytest.mark.parametrize("per", ["sample", "batch"])
def test_dropout_is_off_in_eval(per):
    model = tiny_model(TINY.model_copy(update={"modality_dropout": 0.9, "modality_dropout_per": per})).eval()
    feats, sid = inputs(B=4)
    with torch.no_grad():
        assert not zeroed_blocks(model, model.trace(feats, sid)["fused"]).any()


def test_per_batch_mask_is_one_draw_of_the_cpu_generator():
    """Same seed, same batch mask whatever the batch size: the draw does not depend on B."""
    model = tiny_model(TINY.model_copy(update={"modality_dropout": 0.5, "modality_dropout_per": "batch"}))
    out = []
    for B in (1, 16):
        torch.manual_seed(7)
        out.append(np.stack([model._keep_mask(list(MODALITIES), B, torch.device("cpu"))[0].numpy() for _ in range(30)]))
    np.testing.assert_array_equal(out[0], out[1])
