"""Training fidelity options: fp16 with loss scaling (one process and FSDP2), the two selection scores,
the skip list."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from scipy import stats

from mirage.config import ModelConfig, TrainConfig
from mirage.model import build_model
from mirage.ports import free_port
from mirage.train.batch import Batch
from mirage.train.optim import build_grad_scaler, build_optimizer
from mirage.train.steps import PearsonAccumulator, eval_batch, train_step

DIMS = {"text": (3, 8), "audio": (3, 8), "vision": (3, 8)}
TINY = ModelConfig(n_queries=2, pooler_heads=2, hidden_dim=24, depth=1, heads=2, ff_mult=2, max_time_len=32,
                   modality_dropout=0.0, pooler_dropout=0.0)


def planted_batch(B: int = 8, T: int = 10, P: int = 5, seed: int = 0) -> Batch:
    """Features with a target that is a fixed linear read-out of the text features; the last rows padded."""
    g = torch.Generator().manual_seed(seed)
    feats = {m: torch.randn(B, L, T, D, generator=g) for m, (L, D) in DIMS.items()}
    w = torch.randn(8, P, generator=g)
    target = feats["text"].mean(1) @ w  # (B, T, P)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[:, -2:] = False
    target[~mask] = 0
    return Batch(feats, torch.arange(B) % 2, target, mask)


# ------------------------------------------------------------------------- fp16


def test_fp16_steps_with_a_scaler_on_cpu_learn_and_skip_overflow():
    torch.manual_seed(0)
    model = build_model(TINY, DIMS, n_parcels=5, n_subjects=2, n_output_trs=10)
    tc = TrainConfig(precision="fp16", lr=1e-2)
    opt = build_optimizer(model, tc)
    scaler = build_grad_scaler(tc, torch.device("cpu"))
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled()
    assert build_grad_scaler(TrainConfig(precision="bf16"), torch.device("cpu")) is None
    seen = []
    model.head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    batch = planted_batch()
    cells = float(batch.mask.sum()) * 5
    losses = [float(train_step(model, batch, opt, loss_norm=cells, grad_clip=1.0, precision="fp16", scaler=scaler))
              / cells for _ in range(40)]
    assert set(seen) == {torch.float16}, "the forward ran under float16 autocast"
    assert all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0], losses
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights

    # a step whose scaled gradients overflow float16 is skipped and the scale halves
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scale = scaler.get_scale()
    train_step(model, batch, opt, loss_norm=1e-30, grad_clip=1.0, precision="fp16", scaler=scaler)
    assert scaler.get_scale() == scale * 0.5
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _sharded_overflow_rank(rank: int, world: int, port: int, out: str) -> None:
    """Two FSDP2 ranks take fp16 steps as ``train_step`` does; at step 1 only rank 0's gradient shard overflows."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from mirage.train.steps import _unscale, masked_sse

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = build_model(TINY, DIMS, n_parcels=5, n_subjects=2, n_output_trs=10)
        mesh = init_device_mesh("cpu", (world,))
        for block in model.encoder_blocks():
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        tc = TrainConfig(precision="fp16", lr=1e-2)
        opt = build_optimizer(model, tc)
        scaler = build_grad_scaler(tc, torch.device("cpu"))
        batch = planted_batch()
        idx = torch.arange(rank, 8, world)
        cells = float(batch.mask.sum()) * 5 / world
        for step in range(3):
            with torch.autocast("cpu", dtype=torch.float16):
                pred = model({m: x[idx] for m, x in batch.features.items()}, batch.subject_id[idx])
            loss = masked_sse(pred, batch.fmri[idx], batch.mask[idx]) / cells
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if step == 1 and rank == 0:
                with torch.no_grad():
                    model.head.weights.grad.to_local().view(-1)[0] = float("inf")  # this rank's shard only
            _unscale(scaler, opt)
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
            scaler.step(opt)
            scaler.update()
        full = torch.cat([p.full_tensor().flatten() for p in model.parameters()])
        steps = sorted({int(opt.state[p]["step"]) for p in model.parameters()})
        torch.save({"scale": scaler.get_scale(), "params": full, "steps": steps}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_fp16_ranks_skip_an_overflow_in_one_shard_together(tmp_path):
    """The scaler's inf flag covers every shard: an overflow seen by rank 0 alone skips the step on both ranks."""
    import torch.multiprocessing as mp

    mp.start_processes(_sharded_overflow_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["scale"] == r1["scale"] == torch.amp.GradScaler("cpu").get_scale() * 0.5  # backed off once
    assert r0["steps"] == r1["steps"] == [2]  # 3 steps, the poisoned one skipped on both ranks
    assert torch.isfinite(r0["params"]).all() and torch.equal(r0["params"], r1["params"])


@pytest.mark.slow
def test_fp16_fsdp2_two_ranks_follow_one_process(train_cfg, feature_store, tmp_path):
    """fp16 + per-batch modality dropout: two ranks draw the masks one process draws, and follow its loss."""
    from mirage.train.launch import spawn
    from mirage.train.loop import LocalSession, fit

    cfg = train_cfg.with_overrides({
        "train.epochs": 2, "train.precision": "fp16", "model.modality_dropout_per": "batch",
        "model.pooler_dropout": 0.0, "train.loader_threads": 0,
    })
    single = fit(cfg, LocalSession(tmp_path / "single"), store=feature_store)
    sharded = spawn(cfg, tmp_path / "fsdp2", nprocs=2)
    l1 = [h["train_loss"] for h in single["history"]]
    l2 = [h["train_loss"] for h in sharded["history"]]
    assert all(np.isfinite(l1)) and l1[1] < l1[0]
    np.testing.assert_allclose(l2, l1, rtol=1e-4)
    assert [h["loss_scale"] for h in sharded["history"]] == [h["loss_scale"] for h in single["history"]]


# ----------------------------------------------------------------- selection scores


class Replay(torch.nn.Module):
    """A stand-in network that returns the prediction carried in the batch's features."""

    def forward(self, features, subject_id):
        return features["pred"]


def test_pooled_and_per_subject_r_match_scipy_on_float64():
    rng = np.random.default_rng(3)
    B, T, P, S = 7, 6, 4, 3
    pred = rng.normal(size=(B, T, P))
    target = 0.4 * pred + rng.normal(size=(B, T, P)) + rng.normal(size=(1, 1, P))
    mask = np.ones((B, T), bool)
    mask[[1, 4], -3:] = False  # run ends inside two windows: zero fMRI there
    target[~mask] = 0.0
    subj = np.array([0, 1, 2, 0, 1, 2, 0])
    real = np.array([1, 1, 1, 1, 1, 1, 0], bool)  # the last window only evens out ranks
    mask[~real] = False
    batch = Batch({"pred": torch.tensor(pred)}, torch.tensor(subj), torch.tensor(target), torch.tensor(mask))
    acc, pooled = PearsonAccumulator(S, P), PearsonAccumulator(1, P)
    eval_batch(Replay(), batch, acc, "fp32", pooled=pooled, real=torch.tensor(real))
    r_subject, r_pooled = acc.compute().numpy(), pooled.compute()[0].numpy()
    for s in range(S):
        rows = (subj[:, None] == s) & mask
        for p in range(P):
            assert r_subject[s, p] == pytest.approx(stats.pearsonr(pred[..., p][rows], target[..., p][rows])[0],
                                                    abs=1e-10)
    for p in range(P):  # every row of every real window, all subjects, padded rows included
        x, y = pred[real][..., p].ravel(), target[real][..., p].ravel()
        assert r_pooled[p] == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-10)
    # padded rows count in the pooled score only: leaving them out changes it
    x, y = pred[..., 0][mask], target[..., 0][mask]
    assert abs(r_pooled[0] - stats.pearsonr(x, y)[0]) > 1e-3


@pytest.mark.parametrize("selection", ["pooled", "per_subject"])
def test_selection_metric_picks_the_epoch_and_both_reach_mlflow(selection, train_cfg, feature_store, tmp_path):
    from mlflow import MlflowClient

    from mirage import tracking
    from mirage.train.loop import LocalSession, fit

    cfg = train_cfg.with_overrides({
        "train.epochs": 2, "train.selection_metric": selection,
        "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "tracking.experiment": "selection",
    })
    with tracking.tracked_run(cfg, "train", "selection") as run_id:
        summary = fit(cfg, LocalSession(tmp_path / "ck"), store=feature_store,
                      on_epoch=tracking.EpochLogger(cfg.tracking.uri, run_id))
    hist = summary["history"]
    for h in hist:
        assert h["val_r"] == h[f"val_r_{selection}"]
        assert h["val_r_pooled"] != h["val_r_per_subject"]
    chosen = [h[f"val_r_{selection}"] for h in hist]
    assert summary["best_epoch"] == int(np.argmax(chosen)) and summary["best_val_r"] == max(chosen)
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    for key in ("val_r", "val_r_pooled", "val_r_per_subject"):
        logged = {m.step: m.value for m in client.get_metric_history(run_id, key)}
        assert logged == pytest.approx({h["epoch"]: h[key] for h in hist}), key


# ------------------------------------------------------------------------ skip list


def test_skip_list_removes_the_runs_for_every_subject(test_cfg, synth_root):
    from mirage.data.layout import Release
    from mirage.data.splits import split_runs, split_stimuli

    rel = Release(synth_root)
    data = test_cfg.data
    assert data.skip_runs == []  # the demo's synthetic release has nothing to skip
    everything = {split: split_runs(rel, data, split) for split in ("train", "val")}
    skip = ["s06e01b", "s01e01a"]
    skipped = data.model_copy(update={"skip_runs": skip})
    for split, runs in everything.items():
        left = split_runs(rel, skipped, split)
        assert left == [r for r in runs if r.stimulus_id not in skip]
        assert {r.subject for r in left} == set(data.subjects)
        assert not set(split_stimuli(rel, skipped, split)) & set(skip)
    for sid in skip:  # each skipped stimulus had a run for every subject before
        assert {r.subject for s in everything.values() for r in s if r.stimulus_id == sid} == set(data.subjects)
