"""Golden numbers of the demo preset: a change meant to keep results must keep these.

One epoch of the in-process training loop on the test config (the demo preset shrunk, fixed
``train.seed``), single-threaded with deterministic kernels, is compared with
``tests/golden/demo.json``: the loss of the first optimiser steps, the validation scores after
the epoch and the predictions of one validation window (first TRs and parcels of one run).

Re-recording is only for an intended numerical change (a new default, a fixed bug), never to
make a refactor pass: ``MIRAGE_GOLDEN_WRITE=1 pytest tests/test_golden.py`` writes the file and
skips; commit it with the change that explains it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import mirage.train.loop as loop
from mirage.train.loop import LocalSession, fit

GOLDEN = Path(__file__).parent / "golden" / "demo.json"
WRITE_ENV = "MIRAGE_GOLDEN_WRITE"

N_STEPS = 5
"""Optimiser steps whose loss is recorded (the first of the epoch)."""
WINDOW_TRS, WINDOW_PARCELS = 4, 8
"""The recorded slice of the first validation run of the first subject: (TRs, parcels)."""

# Repeated runs on one machine (single thread, deterministic kernels) give bit-identical numbers;
# two threads instead of one move them by about 1e-7 (relative). The tolerances leave room for
# another CPU or BLAS build while catching any change of data order, initialisation, loss,
# schedule or readout: a different seed or lr moves these values by far more.
LOSS_RTOL = 1e-5  # per-step training loss: the forward and backward of the first steps
SCORE_RTOL, SCORE_ATOL = 1e-4, 1e-6  # val r and val loss after one epoch of AdamW steps compounded
PRED_RTOL, PRED_ATOL = 1e-4, 1e-5  # predictions of one window by the trained model


def _run_golden(cfg, store, root: Path) -> dict:
    """One epoch of ``cfg``: the first step losses, the epoch's validation scores, one window's predictions."""
    steps: list[float] = []
    preds: dict = {}
    real_step = loop.train_step

    def recording_step(model, batch, optimizer, *, loss_norm, **kw):
        sse = real_step(model, batch, optimizer, loss_norm=loss_norm, **kw)
        steps.append(float(sse) / loss_norm)  # the step's masked MSE, as minimised
        return sse

    def keep_predictions(epoch, subject_runs):
        preds.update(subject_runs)

    mp = pytest.MonkeyPatch()
    mp.setattr(loop, "train_step", recording_step)
    try:
        summary = fit(cfg, LocalSession(root), store=store, on_val_predictions=keep_predictions)
    finally:
        mp.undo()
    assert len(steps) >= N_STEPS, f"the training loop took {len(steps)} steps; expected at least {N_STEPS}"
    epoch = summary["history"][0]
    subject = sorted(preds)[0]
    run = sorted(preds[subject])[0]
    window = np.asarray(preds[subject][run])[:WINDOW_TRS, :WINDOW_PARCELS]
    return {
        "step_losses": steps[:N_STEPS],
        "train_loss": epoch["train_loss"],
        "val_r": epoch["val_r"],
        "val_r_pooled": epoch["val_r_pooled"],
        "val_loss": epoch["val_loss"],
        "window": {"subject": subject, "run": run, "trs": WINDOW_TRS, "parcels": WINDOW_PARCELS,
                   "predictions": window.astype(float).tolist()},
    }


def _first_differences(name: str, got, want, rtol: float, atol: float, n: int = 5) -> list[str]:
    """Up to ``n`` lines naming the values of ``got`` outside the tolerance around ``want``."""
    got, want = np.atleast_1d(np.asarray(got, dtype=float)), np.atleast_1d(np.asarray(want, dtype=float))
    if got.shape != want.shape:
        return [f"{name}: shape {got.shape}, recorded {want.shape}"]
    bad = np.argwhere(~np.isclose(got, want, rtol=rtol, atol=atol))[:n]
    label = (lambda i: name) if got.size == 1 else (lambda i: f"{name}{list(map(int, i))}")
    return [f"{label(i)}: {float(got[tuple(i)])!r}, recorded {float(want[tuple(i)])!r} (rtol={rtol}, atol={atol})"
            for i in bad]


def _compare(got: dict, want: dict) -> list[str]:
    diffs = _first_differences("step_losses", got["step_losses"], want["step_losses"], LOSS_RTOL, 0.0)
    diffs += _first_differences("train_loss", got["train_loss"], want["train_loss"], LOSS_RTOL, 0.0)
    for key in ("val_r", "val_r_pooled", "val_loss"):
        diffs += _first_differences(key, got[key], want[key], SCORE_RTOL, SCORE_ATOL)
    gw, ww = got["window"], want["window"]
    if (gw["subject"], gw["run"]) != (ww["subject"], ww["run"]):
        diffs.append(f"window: subject {gw['subject']} run {gw['run']}, recorded {ww['subject']} run {ww['run']}")
    else:
        diffs += _first_differences("window.predictions", gw["predictions"], ww["predictions"], PRED_RTOL, PRED_ATOL)
    return diffs


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


@pytest.fixture
def deterministic_torch():
    """One thread and deterministic kernels for the test, the previous settings restored after it."""
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(det)
    torch.set_num_threads(threads)


def golden_cfg(train_cfg):
    """``train_cfg`` for one epoch with the fixed seed and the validation predictions kept."""
    return train_cfg.with_overrides({
        "train.epochs": 1, "train.seed": 33, "ensemble.epoch_predictions": True,
    })


def test_demo_preset_numbers_match_the_recording(train_cfg, feature_store, tmp_path, deterministic_torch):
    cfg = golden_cfg(train_cfg)
    got = _run_golden(cfg, feature_store, tmp_path / "ckpt")
    if os.environ.get(WRITE_ENV) == "1":
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        record = {"recorded_at_commit": _commit(), "torch": torch.__version__, "seed": cfg.train.seed,
                  "epochs": cfg.train.epochs, **got}
        GOLDEN.write_text(json.dumps(record, indent=1) + "\n")
        pytest.skip(f"{WRITE_ENV}=1: golden numbers written to {GOLDEN}")
    if not GOLDEN.is_file():
        pytest.fail(f"no golden recording at {GOLDEN}; record it with {WRITE_ENV}=1 on the code it should pin")
    diffs = _compare(got, json.loads(GOLDEN.read_text()))
    assert not diffs, (
        "the demo preset's numbers moved from the recording in {}:\n  {}\n"
        "A change meant to keep results must keep these. Only for an intended numerical change, re-record with "
        "{}=1 pytest tests/test_golden.py and commit the new file with that change.".format(
            GOLDEN, "\n  ".join(diffs), WRITE_ENV)
    )
