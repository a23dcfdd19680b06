"""Pure training pieces: masked loss, streaming Pearson r, schedule, epoch plans, prefetching loader."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from scipy import stats

from mirage.config import TrainConfig
from mirage.train.batch import HostBatch
from mirage.train.data import PrefetchLoader, WindowRef, epoch_plan
from mirage.train.optim import build_optimizer, build_scheduler
from mirage.train.steps import PearsonAccumulator, masked_mse


def test_masked_mse_ignores_padded_rows():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    loss = masked_mse(pred, target, mask)
    expected = ((pred - target) ** 2)[mask].mean()
    assert torch.allclose(loss, expected)
    garbage = pred.clone()
    garbage[~mask] = 1e6  # padded rows may hold anything
    assert torch.allclose(masked_mse(garbage, target, mask), loss)


def test_pearson_accumulator_matches_scipy_over_masked_rows_and_shards():
    rng = np.random.default_rng(1)
    B, T, P, S = 6, 7, 5, 3
    pred = rng.normal(size=(B, T, P))
    target = 0.5 * pred + rng.normal(size=(B, T, P))
    mask = rng.random((B, T)) > 0.3
    subj = np.array([0, 1, 2, 0, 1, 0])
    acc = PearsonAccumulator(S, P)
    acc.update(torch.tensor(pred), torch.tensor(target), torch.tensor(mask), torch.tensor(subj))
    r = acc.compute().numpy()
    for s in range(S):
        rows = (subj[:, None] == s) & mask  # (B, T)
        for p in range(P):
            ref = stats.pearsonr(pred[..., p][rows], target[..., p][rows]).statistic
            assert r[s, p] == pytest.approx(ref, abs=1e-10)
    # two shards summed (what all_reduce does across ranks) give the same r
    a, b = PearsonAccumulator(S, P), PearsonAccumulator(S, P)
    for part, idx in ((a, slice(0, 2)), (b, slice(2, None))):
        part.update(*(torch.tensor(x[idx]) for x in (pred, target, mask, subj)))
    a.sums += b.sums
    np.testing.assert_allclose(a.compute().numpy(), r, atol=1e-12)


def test_pearson_identity_is_one_and_constant_is_zero():
    x = torch.randn(2, 9, 3, dtype=torch.float64)
    mask = torch.ones(2, 9, dtype=torch.bool)
    acc = PearsonAccumulator(1, 3)
    acc.update(x, x, mask, torch.zeros(2, dtype=torch.long))
    np.testing.assert_allclose(acc.compute().numpy(), 1.0, atol=1e-12)
    const = PearsonAccumulator(1, 3)
    const.update(torch.zeros_like(x), x, mask, torch.zeros(2, dtype=torch.long))
    assert np.all(const.compute().numpy() == 0)


def test_onecycle_warms_up_for_warmup_frac_then_anneals():
    cfg = TrainConfig(lr=1e-3, warmup_frac=0.2)
    opt = build_optimizer(torch.nn.Linear(2, 2), cfg)
    sched = build_scheduler(opt, cfg, total_steps=50)
    lrs = []
    for _ in range(50):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert int(np.argmax(lrs)) == pytest.approx(0.2 * 50, abs=1)
    assert max(lrs) == pytest.approx(1e-3)
    assert lrs[0] < 1e-4 and lrs[-1] < 1e-5


def _refs(n_valid: list[int], window: int = 4) -> list[WindowRef]:
    return [
        WindowRef(0, "f.h5", f"k{i}", "s", 10, 0, 0, 8, tuple(j < v for j in range(window)))
        for i, v in enumerate(n_valid)
    ]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_epoch_plan_deals_each_global_batch_across_ranks(world):
    refs = _refs([4, 4, 2, 4, 1, 4, 3])
    P = 5
    plans = [epoch_plan(refs, P, 6, r, world, shuffle=True, seed=3, epoch=1) for r in range(world)]
    single = epoch_plan(refs, P, 6, 0, 1, shuffle=True, seed=3, epoch=1)
    assert len({len(p.batches) for p in plans}) == 1  # every rank takes the same number of steps
    for s, batch in enumerate(single.batches):
        dealt = sorted(i for p in plans for i, _ in p.batches[s])
        assert dealt == sorted(i for i, _ in batch)  # ranks together see exactly the global batch
        assert all(p.cells[s] == single.cells[s] for p in plans)
        assert single.cells[s] == sum(refs[i].n_valid for i, _ in batch) * P
    seen = {i for b in single.batches for i, _ in b}
    assert seen == set(range(len(refs)))
    other = epoch_plan(refs, P, 6, 0, 1, shuffle=True, seed=3, epoch=2)
    assert other.batches != single.batches  # reshuffled every epoch


def test_eval_plan_pads_ranks_with_masked_windows():
    refs = _refs([4] * 5)
    plans = [epoch_plan(refs, 2, 4, r, 2, shuffle=False, seed=0, epoch=0) for r in range(2)]
    real = sorted(i for p in plans for b in p.batches for i, ok in b if ok)
    assert real == list(range(5))  # every window evaluated exactly once
    assert len(plans[0].batches) == len(plans[1].batches)


def test_prefetch_loader_keeps_order_and_overlaps():
    def build(i):
        time.sleep(0.02)
        return HostBatch(np.full((1, 2, 3, 1, 2), i, np.float16), np.array([i]), np.zeros((1, 2, 3), np.float32),
                         np.ones((1, 2), bool))

    items = list(range(12))
    for threads in (0, 1, 3):
        loader = PrefetchLoader(build, items, threads)
        got = [int(b.subject_id[0]) for b in loader]
        assert got == items
        assert loader.bytes == sum(build(0).nbytes for _ in items)
    t0 = time.perf_counter()
    fast = PrefetchLoader(build, items, 4)
    for _ in fast:
        time.sleep(0.02)  # the "step"
    assert fast.wait_s < 0.5 * (time.perf_counter() - t0)


def test_host_batch_to_model_layout():
    feats = np.arange(2 * 5 * 3 * 4 * 6, dtype=np.float16).reshape(2, 5, 3, 4, 6)  # (B, T, 3, L, D)
    hb = HostBatch(feats, np.array([0, 3]), np.zeros((2, 4, 7), np.float32), np.ones((2, 4), bool))
    batch = hb.to(torch.device("cpu"), ["text", "audio", "vision"])
    for i, m in enumerate(("vision", "audio", "text")):
        x = batch.features[m]
        assert x.shape == (2, 4, 5, 6) and x.dtype == torch.float32  # (B, L, T, D)
        np.testing.assert_array_equal(x.numpy(), feats[:, :, i].transpose(0, 2, 1, 3).astype(np.float32))


def test_run_name_follows_what_changes_the_model(test_cfg):
    from mirage.distributed.train import run_name

    base = run_name(test_cfg)
    assert base.startswith("train-")
    assert run_name(test_cfg.with_overrides({"train.storage": "/elsewhere", "train.max_failures": 5})) == base
    assert run_name(test_cfg.with_overrides({"train.lr": 1e-5})) != base
    assert run_name(test_cfg.with_overrides({"train.name": "mine"})) == "mine"
