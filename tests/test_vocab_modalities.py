"""One modality order: the store axis is ``MODALITIES``, the fusion order ``FUSION_ORDER`` is derived from it.

Every other use (the config's choices and default, the model's concatenation, the reference
loader, the store's manifest, extraction's axis indices) comes from these two constants; a test
here fails when a module spells its own order again.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
import torch

from mirage.config import FUSION_ORDER, MODALITIES, MODALITY_AXIS, ConfigError, ModelConfig, load_config
from mirage.errors import FeatureStoreError
from mirage.features.store import MANIFEST, FeatureStore, StoreWriter
from mirage.model import build_model
from mirage.model.reference import reference_model_args
from mirage.train.batch import HostBatch

PLATFORM = Path(__file__).resolve().parents[1] / "platform" / "mirage"
SUBSETS = [[m for j, m in enumerate(FUSION_ORDER) if keep >> j & 1] for keep in range(1, 2 ** len(FUSION_ORDER))]
"""Every non-empty subset of the modalities, in the fusion order."""


def test_the_orders_are_the_reference_fusion_order_and_the_store_axis():
    assert FUSION_ORDER == ("text", "audio", "vision")  # the reference concatenates in this order
    assert MODALITIES == ("vision", "audio", "text")  # axis 1 of every stored feature array
    assert sorted(FUSION_ORDER) == sorted(MODALITIES)
    assert all(MODALITIES[MODALITY_AXIS[m]] == m for m in MODALITIES)


def test_config_choices_and_default_are_the_fusion_order():
    field = ModelConfig.model_fields["modalities"]
    (item,) = get_args(field.annotation)
    assert get_args(item) == FUSION_ORDER
    assert ModelConfig().modalities == list(FUSION_ORDER) == load_config("paper").model.modalities


def test_config_refuses_another_order():
    with pytest.raises(ConfigError, match=r"fusion order \['text', 'audio', 'vision'\].*write \['text', 'vision'\]"):
        load_config("demo", ["model.modalities=[vision, text]"])
    assert load_config("demo", ["model.modalities=[text, vision]"]).model.modalities == ["text", "vision"]


@pytest.mark.parametrize("subset", SUBSETS, ids="+".join)
def test_model_concatenates_in_the_fusion_order(subset):
    """The fused vector is the projected modalities side by side, in FUSION_ORDER."""
    cfg = ModelConfig(modalities=subset, n_queries=2, pooler_heads=2, hidden_dim=12, depth=1, heads=2,
                      max_time_len=16, modality_dropout=0.0)
    dims = {m: (3, 4) for m in MODALITIES}
    model = build_model(cfg, dims, n_parcels=5, n_subjects=1, n_output_trs=2).eval()
    assert model.modalities == [m for m in FUSION_ORDER if m in subset]
    feats = {m: torch.randn(2, 3, 6, 4) for m in MODALITIES}
    with torch.no_grad():
        stages = model.trace(feats, torch.zeros(2, dtype=torch.long))
    width = model.dim // len(subset)
    blocks = stages["fused"].split(width, dim=-1)  # (B, T, width) each
    assert len(blocks) == len(subset)
    for block, m in zip(blocks, model.modalities):
        torch.testing.assert_close(block, stages[f"projected_{m}"], rtol=0, atol=0)


def test_reference_loader_takes_the_fusion_order(tmp_path):
    """Poolers found in a reference state dict come out in the fusion order, whatever the key order."""
    cfg_yaml = tmp_path / "config.yaml"
    stack = {m: {"kind": "layer_cross_attn", "n_queries": 2, "heads": 2} for m in MODALITIES}
    stack["fusion"] = {"kind": "cat"}
    cfg_yaml.write_text(json.dumps({
        "model": {"hidden_dim": 12, "depth": 1, "heads": 2, "ff_mult": 2, "n_output_timesteps": 2},
        "modality_stack": stack,
        "readout": {"temporal_reducer": {"kind": "adaptive_avg"}, "head": {"kind": "subject_linear"}},
    }))
    sd = {f"layer_poolers.{m}.query_tokens": torch.zeros(2, 4) for m in MODALITIES}  # store order
    sd["head.weights"] = torch.zeros(1, 12, 5)
    sd["temporal_encoder.time_pos_embed"] = torch.zeros(1, 16, 12)
    cfg, dims, *_ = reference_model_args(cfg_yaml, sd)
    assert cfg.modalities == list(FUSION_ORDER) and list(dims) == list(FUSION_ORDER)


def test_store_records_its_axis_and_refuses_another(test_cfg, tmp_path):
    """Rows set by modality name at extraction reach the model under the same name in training."""
    fcfg = test_cfg.features.model_copy(update={"store": str(tmp_path / "store")})
    value = {"vision": 1.0, "audio": 2.0, "text": 3.0}
    with StoreWriter(fcfg) as w:
        part = w.begin("s", (2, len(MODALITIES), 3, 4))
        for m, v in value.items():
            for frame in range(2):
                part.set(MODALITY_AXIS[m], frame, np.full((3, 4), v, np.float32))
        part.commit()
        root = w.root
    store = FeatureStore(root)
    assert store.manifest["modalities"] == list(MODALITIES)
    window = store.read_window("s", 0, 2)[None]  # (1, T, 3, L, D)
    batch = HostBatch(features=window, subject_id=np.zeros(1, np.int64), fmri=np.zeros((1, 2, 5), np.float32),
                      mask=np.ones((1, 2), bool)).to(torch.device("cpu"), list(FUSION_ORDER))
    assert {m: torch.unique(x).tolist() for m, x in batch.features.items()} == {m: [v] for m, v in value.items()}
    manifest = json.loads((root / MANIFEST).read_text())
    manifest["modalities"] = list(FUSION_ORDER)  # a store written with another axis order
    (root / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(FeatureStoreError, match=r"modality axis \['text', 'audio', 'vision'\]; expected "
                                                r"\['vision', 'audio', 'text'\]"):
        FeatureStore(root)


def _spelled_orders(tree: ast.AST) -> list[int]:
    """Lines of sequence literals (tuple, list, set, Literal[...]) made of all the modality names."""
    names = set(MODALITIES)
    lines = []
    for node in ast.walk(tree):
        elts = None
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            elts = node.elts
        if elts and all(isinstance(e, ast.Constant) for e in elts) and {e.value for e in elts} >= names:
            lines.append(node.lineno)
    return lines


def test_no_module_spells_its_own_modality_order():
    """Only ``mirage/config.py`` writes the modality names as one sequence; everything else derives."""
    found = {}
    for path in sorted(PLATFORM.rglob("*.py")):
        lines = _spelled_orders(ast.parse(path.read_text(), str(path)))
        if lines and path != PLATFORM / "config.py":
            found[str(path.relative_to(PLATFORM))] = lines
    assert not found, f"modality orders spelled outside mirage/config.py (use MODALITIES / FUSION_ORDER): {found}"
    assert _spelled_orders(ast.parse((PLATFORM / "config.py").read_text())), "config.py defines MODALITIES"
