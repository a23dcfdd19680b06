"""FSDP2 sharding, distributed checkpoints and full-state export, applied to an unchanged model.

Every function here is a collective when a process group is up: call it on every rank.
Without a process group (a plain single-process loop) the same calls work unsharded.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)


@contextlib.contextmanager
def _single_process_ok():
    """Without a process group, torch.distributed.checkpoint warns that it runs in one process: intended."""
    with warnings.catch_warnings():
        if not is_distributed():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def shard_model(model: nn.Module, device: torch.device) -> nn.Module:
    """``fully_shard`` each of ``model.encoder_blocks()``, then the root, over a 1-D mesh of all ranks.

    The model must hold identical weights on every rank (same seed) and sit on ``device``.
    Gloo serves CPU ranks, NCCL GPU ranks (the process group the launcher created).
    Gradients are summed over ranks, not averaged: each rank's loss is already normalised by the
    whole global batch, so every rank's backward carries the magnitudes one process would (which
    keeps fp16 loss scaling on the single-process schedule).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    units = [*model.encoder_blocks(), model]
    for unit in units:
        fully_shard(unit, mesh=mesh)
    for unit in units:
        unit.set_force_sum_reduction_for_comms(True)
        unit.set_gradient_divide_factor(1.0)
    return model


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Write model and optimiser shards of this rank into ``path`` (``torch.distributed.checkpoint``)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with _single_process_ok():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a checkpoint written by :func:`save_checkpoint` (any world size) into this rank's shards."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with _single_process_ok():
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole float32 state dict on CPU at rank 0 (empty on other ranks)."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.float() for k, v in sd.items()}
