"""mirage.train: pure-PyTorch training (no Ray, no MLflow).

- ``batch``: the model-facing batch and its move to the device;
- ``data``: feature-store + fMRI windows of a split, per-rank epoch plans, the prefetching loader;
- ``steps``: masked MSE, one optimiser step, streaming per-parcel Pearson r;
- ``optim``: AdamW and OneCycle;
- ``fsdp``: FSDP2 sharding, distributed checkpoints, full-state export;
- ``loop``: the per-worker loop behind a small ``Session`` interface (Ray Train, torchrun or plain);
- ``launch``: torchrun / spawned-process entry point.
"""
