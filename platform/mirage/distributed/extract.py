"""Feature extraction on a Ray Data actor pool.

Work items (one span of ``features.cutoffs_per_item`` passes of one stimulus) flow through
``map_batches`` into :class:`ExtractActor`, which loads the backbone once per actor and decodes
the media itself (PyAV). The driver streams results back, assembles each stimulus as its last
span arrives and writes it to the store atomically, so an interrupted job keeps every finished
stimulus and a re-run computes only what is missing. Ray restarts a lost actor and retries its
items. A stimulus whose movie does not decode fails alone: the others still finish.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np
import ray

from mirage.config import MODALITIES, Config, FeaturesConfig
from mirage.distributed.cluster import check_cluster_gpus, init_ray
from mirage.errors import MirageError
from mirage.features.extract import (
    ExtractResult,
    Extractor,
    ItemFeatures,
    StimulusPlan,
    WorkItem,
    plan_items,
    stimuli_of,
)
from mirage.features.store import PartialWrite, StoreWriter

log = logging.getLogger(__name__)


class ExtractActor:
    """Ray Data callable class: one backbone per actor; a batch of work items -> their features."""

    def __init__(self, features_cfg: dict[str, Any]):
        self.extractor = Extractor(FeaturesConfig.model_validate(features_cfg))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        keys = ("stimulus_id", "start", "error", *ItemFeatures().to_row())
        out: dict[str, list] = {k: [] for k in keys}
        for i in range(len(batch["stimulus_id"])):
            item = WorkItem(
                stimulus_id=str(batch["stimulus_id"][i]),
                video=str(batch["video"][i]),
                transcript=str(batch["transcript"][i]) or None,
                start=int(batch["start"][i]),
                stop=int(batch["stop"][i]),
                n_passes=int(batch["n_passes"][i]),
            )
            feats, error = ItemFeatures(), ""
            try:
                feats = self.extractor.extract_item(item)
            except MirageError as e:
                error = str(e)
            except Exception as e:  # any other failure fails this stimulus only, named by its file
                error = f"{item.video}: {type(e).__name__}: {e}"
            row = {"stimulus_id": item.stimulus_id, "start": item.start, "error": error, **feats.to_row()}
            row["dims"] = [self.extractor.backbone.n_layers, self.extractor.backbone.dim]
            for k in keys:
                out[k].append(row[k])
        return out


def plan(
    cfg: Config, writer: StoreWriter, overwrite: bool, result: ExtractResult, stimuli=None
) -> tuple[list[WorkItem], dict[str, StimulusPlan]]:
    """Work items of every stimulus not yet stored (all with ``overwrite``) and their plans;
    unreadable movies or transcripts fail here.

    With ``overwrite`` nothing is removed ahead: each stored stimulus is replaced when its new
    features commit, and keeps its old ones if its recomputation fails.
    """
    items: list[WorkItem] = []
    plans: dict[str, StimulusPlan] = {}
    for sid, (video, transcript) in stimuli_of(cfg, stimuli).items():
        if not overwrite and writer.has(sid):
            result.skipped.append(sid)
            continue
        try:
            plans[sid], its = plan_items(sid, video, transcript, cfg.features)
            items += its
        except MirageError as e:
            result.failed[sid] = str(e)
    return items, plans


def run_extract(
    cfg: Config,
    overwrite: bool = False,
    stimuli: list[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> ExtractResult:
    """Fill the feature store of ``cfg.features`` with a Ray Data actor pool (connects to Ray if needed).

    Returns an :class:`ExtractResult`; failed stimuli are listed with their errors and add
    nothing to the store (with ``overwrite``, a stored stimulus whose recomputation fails keeps
    its old features).
    """
    say = progress or (lambda msg: log.info(msg))
    t0 = time.perf_counter()
    with StoreWriter(cfg.features) as writer:
        result = _run(cfg, writer, overwrite, stimuli, say, t0)
    result.seconds = time.perf_counter() - t0
    return result


def _run(cfg: Config, writer: StoreWriter, overwrite: bool, stimuli, say, t0: float) -> ExtractResult:
    result = ExtractResult(store=writer.root)
    items, plans = plan(cfg, writer, overwrite, result, stimuli)
    expected: dict[str, int] = {}
    for it in items:
        expected[it.stimulus_id] = expected.get(it.stimulus_id, 0) + 1
    say(f"store {writer.root}: {len(result.skipped)} stored, {len(expected)} to extract "
        f"({len(items)} work items), {len(result.failed)} unreadable")
    if not items:
        return result

    init_ray(cfg.ray)
    check_cluster_gpus(cfg, "extract")  # a GPU request the cluster can never meet would wait forever
    f = cfg.features
    rows = [{**asdict(it), "transcript": it.transcript or ""} for it in items]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        ExtractActor,
        fn_constructor_kwargs={"features_cfg": f.model_dump(mode="json")},
        batch_size=f.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=f.actors),
        num_gpus=f.gpus_per_actor,
        num_cpus=f.cpus_per_actor,
    )
    open_parts: dict[str, tuple[PartialWrite, set[int]]] = {}  # stimuli being assembled on disk
    try:
        for row in ds.iter_rows():
            if result.first_result_s is None:
                result.first_result_s = time.perf_counter() - t0
            sid = str(row["stimulus_id"])
            if sid in result.failed:
                continue
            try:
                if row["error"]:
                    raise MirageError(str(row["error"]))
                feats = ItemFeatures.from_row(row)
                if sid not in open_parts:
                    n_layers, dim = (int(x) for x in row["dims"])
                    p = plans[sid]
                    open_parts[sid] = (writer.begin(sid, (p.n_frames, len(MODALITIES), n_layers, dim), p.frames), set())
                part, starts = open_parts[sid]
                feats.write(part)
                starts.add(int(row["start"]))
            except MirageError as e:
                result.failed[sid] = str(e)
                if sid in open_parts:
                    open_parts.pop(sid)[0].abort()
                say(f"FAILED {sid}: {e}")
                continue
            if len(starts) == expected[sid]:
                open_parts.pop(sid)[0].commit()
                result.written.append(sid)
                result.cutoffs += len(plans[sid].passes)
                say(f"stored {sid} ({len(result.written)}/{len(expected)})")
    finally:
        for sid, (part, _) in open_parts.items():  # interrupted, or spans lost without an error
            part.abort()
            result.failed.setdefault(sid, "incomplete: not every span came back from the actor pool")
    return result
