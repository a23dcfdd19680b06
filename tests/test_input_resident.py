"""Resident training input: shards held in memory give the batches and losses of the memmap reader."""

from __future__ import annotations

import numpy as np
import pytest

from mirage.train.data import WindowDataset, WindowRef, epoch_plan, shard_owner, sharded_epoch_plan
from mirage.train.loop import LocalSession, fit


def _refs(n: int) -> list[WindowRef]:
    """Windows of 3 stimuli seen by 2 subjects, listed subject by subject."""
    return [WindowRef(i % 2, f"sub{i % 2}.h5", f"k{i}", f"s{i % 3}", 10, 0, 8 * (i // 6), 8 * (i // 6) + 8,
                      tuple(j < 1 + i % 4 for j in range(4))) for i in range(n)]


@pytest.mark.parametrize("n,batch,world", [(7, 6, 1), (7, 6, 2), (13, 4, 3), (10, 3, 2), (5, 5, 5)])
def test_sharded_plan_sees_every_window_once_per_epoch_from_own_shard(n, batch, world):
    refs = _refs(n)
    owner = shard_owner(refs, batch, world)
    plans = [sharded_epoch_plan(refs, 3, batch, r, owner, world, seed=5, epoch=2) for r in range(world)]
    memmap = epoch_plan(refs, 3, batch, 0, 1, shuffle=True, seed=5, epoch=2)
    assert {len(p.batches) for p in plans} == {len(memmap.batches)}  # same step count
    seen = set()
    for r, p in enumerate(plans):
        idx = [i for b in p.batches for i, _ in b]
        assert set(idx) == set(np.flatnonzero(owner == r))  # all windows of its own shard, no other
        seen |= set(idx)
        assert [len(b) for b in p.batches] == [len(range(r, batch, world))] * len(p.batches)
        assert p.cells == plans[0].cells
    assert seen == set(range(n))
    for s in range(len(memmap.batches)):  # cells count the windows all ranks take at step s
        assert plans[0].cells[s] == sum(refs[i].n_valid for p in plans for i, _ in p.batches[s]) * 3
    if world == 1:
        assert plans[0].batches == memmap.batches and plans[0].cells == memmap.cells


def test_shards_keep_a_stimulus_on_one_rank():
    refs = _refs(12)  # 3 stimuli x 2 subjects x 2 windows, listed subject by subject
    owner = shard_owner(refs, 6, 3)
    for s in ("s0", "s1", "s2"):
        assert len({int(owner[i]) for i, r in enumerate(refs) if r.stimulus_id == s}) == 1  # both subjects together


@pytest.mark.parametrize("world", [1, 2])
def test_resident_batches_are_bit_identical_to_memmap(train_cfg, feature_store, world):
    cfg = train_cfg.with_overrides({"model.layers": [2, 0]})
    res_cfg = cfg.with_overrides({"train.input": "resident"})
    memmap = WindowDataset(cfg, "train", feature_store)
    assert memmap.owner is None and memmap.resident is None
    stims = {r.stimulus_id for r in memmap.refs}
    selected = sum(feature_store.read(s)[:, :, :2].nbytes for s in stims)  # the 2 selected layers of every stimulus
    total, held = 0, 0
    for rank in range(world):
        resident = WindowDataset(res_cfg, "train", feature_store, rank=rank, world_size=world)
        assert resident.resident is not None
        total += len(resident.resident.refs)
        held += resident.resident.nbytes
        plan = resident.plan(cfg.train.batch_size, shuffle=True, seed=cfg.train.seed, epoch=1)
        for items in plan.batches:
            a, b = memmap.batch(items), resident.batch(items)
            assert a.features.tobytes() == b.features.tobytes() and a.features.shape == b.features.shape
            assert a.fmri.tobytes() == b.fmri.tobytes()
            assert np.array_equal(a.mask, b.mask) and np.array_equal(a.subject_id, b.subject_id)
        assert not resident._maps  # windows came from memory, not from the store's maps
        if world > 1:
            assert resident.resident.nbytes < selected  # a shard holds only part of the features
    assert total == len(memmap)
    assert held <= selected + (world - 1) * memmap.load(0)[0].nbytes  # ranks together hold each stimulus ~once
    val = WindowDataset(res_cfg, "val", feature_store)
    assert val.resident is None  # validation reads memmaps


def test_resident_training_follows_the_memmap_loss_curve(train_cfg, feature_store, tmp_path):
    cfg = train_cfg.with_overrides({"train.epochs": 2, "train.loader_threads": 0})
    a = fit(cfg, LocalSession(tmp_path / "memmap"), store=feature_store)
    b = fit(cfg.with_overrides({"train.input": "resident"}), LocalSession(tmp_path / "resident"), store=feature_store)
    la, lb = [h["train_loss"] for h in a["history"]], [h["train_loss"] for h in b["history"]]
    assert la == lb and la[1] < la[0]
    assert [h["val_r"] for h in a["history"]] == [h["val_r"] for h in b["history"]]
