"""The training loop without Ray: ``torchrun`` ranks, or local processes spawned from Python.

``torchrun --nproc_per_node N -m mirage.train.launch --config run.yaml --root DIR`` runs
:func:`mirage.train.loop.fit` on N FSDP2 ranks (gloo on CPU, NCCL on GPU) with checkpoints in
``DIR/epoch_NNNN``; rank 0 writes ``DIR/summary.json``. Used by the benchmark and the tests
that compare world sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from mirage.config import load_config
from mirage.ports import free_port
from mirage.train.loop import LocalSession, fit

SUMMARY = "summary.json"


def _device(use_gpu: bool):
    import torch

    if use_gpu and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def run_rank(config_path: str, root: str) -> dict[str, Any]:
    """One rank: join the process group from the environment, train, leave."""
    import torch.distributed as dist

    cfg = load_config(config_path)
    device = _device(cfg.train.use_gpu)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        summary = fit(cfg, LocalSession(Path(root), device=device))
        if dist.get_rank() == 0:
            (Path(root) / SUMMARY).write_text(json.dumps(summary))
        return summary
    finally:
        dist.destroy_process_group()


def _spawned(rank: int, world: int, port: int, config_path: str, root: str) -> None:
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank),
         "WORLD_SIZE": str(world)}
    )
    run_rank(config_path, root)


def spawn(cfg, root: str | os.PathLike, nprocs: int) -> dict[str, Any]:
    """Train ``cfg`` on ``nprocs`` local processes (FSDP2 ranks); returns rank 0's summary."""
    import torch.multiprocessing as mp

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    config_path = root / "config.yaml"
    cfg.dump(config_path)
    mp.start_processes(_spawned, args=(nprocs, free_port(), str(config_path), str(root)), nprocs=nprocs,
                       join=True, start_method="spawn")
    return json.loads((root / SUMMARY).read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="one torchrun rank of the MIRAGE training loop")
    p.add_argument("--config", required=True, help="resolved config YAML")
    p.add_argument("--root", required=True, help="checkpoint folder shared by the ranks")
    a = p.parse_args(argv)
    run_rank(a.config, a.root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
