"""Feature extraction on a Ray Data actor pool: actors write the store, the driver commits.

Work items (one span of ``features.cutoffs_per_item`` passes of one stimulus) flow through
``map_batches`` into :class:`ExtractActor`, which loads the backbone once per actor, decodes the
media itself (PyAV) and writes each item's features as a span file straight into the store
directory on the shared volume (:mod:`mirage.features.spans`). It returns only the span's metadata
(stimulus, passes, file, size, checksum, or the error). When every span of a stimulus is on disk,
a small Ray task (``features.assemble_cpus`` on a worker: a head that offers no CPUs never runs
it) checks and joins them into the stimulus's array; the driver renames that into place and
records it in the manifest under the store's lease. No feature byte passes through the driver.

An interrupted job keeps its finished stimuli and its spans: a re-run computes only the missing
spans (a corrupt one is removed when joined and computed again, once). Ray restarts a lost actor
and retries its items. A stimulus whose movie does not decode fails alone: the others still finish.
"""

from __future__ import annotations

import logging
import pickle
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np
import ray

from mirage.config import Config, FeaturesConfig
from mirage.distributed.cluster import check_cluster_gpus, init_ray
from mirage.errors import FeatureStoreError, MirageError
from mirage.features.extract import (
    ExtractResult,
    Extractor,
    StimulusPlan,
    WorkItem,
    commit_spans,
    plan_items,
    span_key,
    stimuli_of,
)
from mirage.features.spans import Assembled, SpanMeta, assemble, existing_spans, write_span
from mirage.features.store import StoreWriter, library_versions, remove_spans

log = logging.getLogger(__name__)

ROUNDS = 2
"""Pipeline rounds: the first computes the missing spans, the second those found corrupt when joined."""


class ExtractActor:
    """Ray Data callable class: one backbone per actor; a batch of work items -> span files in the
    store at ``root`` and one metadata row per item."""

    def __init__(self, features_cfg: dict[str, Any], root: str):
        self.extractor = Extractor(FeaturesConfig.model_validate(features_cfg))
        self.root = root

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        keys = ("stimulus_id", "start", "stop", "rel", "sha256", "bytes", "error")
        out: dict[str, list] = {k: [] for k in keys}
        bb = self.extractor.backbone
        for i in range(len(batch["stimulus_id"])):
            item = WorkItem(
                stimulus_id=str(batch["stimulus_id"][i]),
                video=str(batch["video"][i]),
                transcript=str(batch["transcript"][i]) or None,
                start=int(batch["start"][i]),
                stop=int(batch["stop"][i]),
                n_passes=int(batch["n_passes"][i]),
            )
            row = {"stimulus_id": item.stimulus_id, "start": item.start, "stop": item.stop, "rel": "", "sha256": "",
                   "bytes": 0, "error": ""}
            try:
                arrays = self.extractor.extract_item(item).to_arrays(bb.n_layers, bb.dim)
                row.update(write_span(self.root, item.stimulus_id, str(batch["key"][i]), item.start, item.stop,
                                      arrays).to_row())
            except MirageError as e:
                row["error"] = str(e)
            except Exception as e:  # any other failure fails this stimulus only, named by its file
                row["error"] = f"{item.video}: {type(e).__name__}: {e}"
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
    its old features). ``driver_rows``/``driver_bytes`` count what the actors sent the driver.
    """
    say = progress or (lambda msg: log.info(msg))
    t0 = time.perf_counter()
    with StoreWriter(cfg.features) as writer:
        result = _run(cfg, writer, overwrite, stimuli, say, t0)
    result.seconds = time.perf_counter() - t0
    return result


class _Commits:
    """The driver's side of committing: which spans of each stimulus are on disk, the join tasks in
    flight, and the commit (rename + manifest entry) of each joined stimulus."""

    def __init__(self, writer: StoreWriter, f: FeaturesConfig, items: list[WorkItem], plans: dict[str, StimulusPlan],
                 reused: set[str], result: ExtractResult, say: Callable[[str], None]):
        self.writer, self.plans, self.reused, self.result, self.say = writer, plans, reused, result, say
        self.items: dict[str, list[WorkItem]] = {}
        for it in items:
            self.items.setdefault(it.stimulus_id, []).append(it)
        self.wanted = {sid: {(it.start, it.stop) for it in its} for sid, its in self.items.items()}
        self.spans: dict[str, dict[tuple[int, int], SpanMeta]] = {sid: {} for sid in self.items}
        self.running: dict[ray.ObjectRef, str] = {}
        self.joining: set[str] = set()  # joined or being joined: a span that comes back twice starts nothing
        self.redo: list[WorkItem] = []
        self._join = ray.remote(assemble).options(num_cpus=f.assemble_cpus, max_retries=2)

    def add(self, meta: SpanMeta) -> None:
        """A span is on disk; join its stimulus once all of them are."""
        sid, span = meta.stimulus_id, (meta.start, meta.stop)
        if sid in self.result.failed or sid in self.joining or span not in self.wanted.get(sid, ()):
            return
        self.spans[sid][span] = meta
        if self.spans[sid].keys() == self.wanted[sid]:
            p = self.plans[sid]
            self.joining.add(sid)
            ref = self._join.remote(str(self.writer.root), sid, p.n_frames, p.frames, list(self.spans[sid].values()))
            self.running[ref] = sid

    def fail(self, sid: str, error: str) -> None:
        if sid not in self.result.failed:
            self.result.failed[sid] = error
            self.say(f"FAILED {sid}: {error}")

    def poll(self, wait: bool = False) -> None:
        """Commit the stimuli whose join finished (all of them with ``wait``)."""
        while self.running:
            done, _ = ray.wait(list(self.running), num_returns=len(self.running) if wait else 1,
                               timeout=None if wait else 0)
            if not done:
                return
            for ref in done:
                self._finish(self.running.pop(ref), ref)

    def _finish(self, sid: str, ref: ray.ObjectRef) -> None:
        try:
            assembled: Assembled = ray.get(ref)
        except ray.exceptions.RayError as e:
            self.fail(sid, f"joining the spans of {sid} failed: {e}")
            return
        if assembled.bad:  # removed by the join: compute them again
            bad = {(m.start, m.stop) for m in assembled.bad}
            for key in bad:
                self.spans[sid].pop(key, None)
            self.redo += [it for it in self.items[sid] if (it.start, it.stop) in bad]
            self.joining.discard(sid)
            self.result.spans_reused -= sum(m.rel in self.reused for m in assembled.bad)
            self.say(f"{sid}: {len(bad)} corrupt span(s) removed; computing them again")
            return
        try:
            commit_spans(self.writer, assembled)
        except FeatureStoreError as e:
            if not self.writer.lease_held:
                raise
            self.fail(sid, str(e))
            return
        self.result.written.append(sid)
        self.result.cutoffs += len(self.plans[sid].passes)
        self.say(f"stored {sid} ({len(self.result.written)}/{len(self.items)})")


def _run(cfg: Config, writer: StoreWriter, overwrite: bool, stimuli, say, t0: float) -> ExtractResult:
    result = ExtractResult(store=writer.root)
    items, plans = plan(cfg, writer, overwrite, result, stimuli)
    f = cfg.features
    libraries = library_versions()
    keys = {it.stimulus_id: span_key(plans[it.stimulus_id], it.transcript, f, libraries) for it in items}
    on_disk = {sid: existing_spans(writer.root, sid, key) for sid, key in keys.items()}
    todo = [it for it in items if (it.start, it.stop) not in on_disk[it.stimulus_id]]
    result.spans_reused = len(items) - len(todo)
    say(f"store {writer.root}: {len(result.skipped)} stored, {len(keys)} to extract "
        f"({len(todo)} work items, {result.spans_reused} spans kept from an earlier run), "
        f"{len(result.failed)} unreadable")
    if not items:
        return result

    init_ray(cfg.ray)
    if todo:
        check_cluster_gpus(cfg, "extract")  # a GPU request the cluster can never meet would wait forever
    reused = {m.rel for spans in on_disk.values() for m in spans.values()}
    commits = _Commits(writer, f, items, plans, reused, result, say)
    try:
        for spans in on_disk.values():
            for meta in spans.values():
                commits.add(meta)
        for _ in range(ROUNDS):
            if todo:
                _stream(cfg, writer, todo, keys, commits, result, t0)
            commits.poll(wait=True)
            todo, commits.redo = [it for it in commits.redo if it.stimulus_id not in result.failed], []
            if not todo:
                break
        for tmp in writer.root.glob("*.tmp-*"):  # joins cut short on a lost node and retried elsewhere
            tmp.unlink(missing_ok=True)
    finally:
        for sid in commits.items:  # interrupted, or spans lost without an error: their spans stay for a re-run
            if sid not in result.written:
                result.failed.setdefault(sid, "incomplete: not every span came back from the actor pool")
        for sid, error in result.failed.items():
            if sid in commits.items and not error.startswith("incomplete") and writer.lease_held:
                remove_spans(writer.root, sid)
    return result


def _stream(cfg: Config, writer: StoreWriter, todo: list[WorkItem], keys: dict[str, str], commits: _Commits,
            result: ExtractResult, t0: float) -> None:
    """Run ``todo`` on the actor pool; each metadata row that comes back is counted and handed to ``commits``."""
    f = cfg.features
    rows = [{**asdict(it), "transcript": it.transcript or "", "key": keys[it.stimulus_id]} for it in todo]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        ExtractActor,
        fn_constructor_kwargs={"features_cfg": f.model_dump(mode="json"), "root": str(writer.root)},
        batch_size=f.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=f.actors),
        num_gpus=f.gpus_per_actor,
        num_cpus=f.cpus_per_actor,
        **({"resources": dict(f.resources)} if f.resources else {}),
    )
    for row in ds.iter_rows():
        row = dict(row)
        result.driver_rows += 1
        result.driver_bytes += len(pickle.dumps(row))
        if result.first_result_s is None:
            result.first_result_s = time.perf_counter() - t0
        if row["error"]:
            commits.fail(str(row["stimulus_id"]), str(row["error"]))
        else:
            result.spans_computed += 1
            result.span_bytes += int(row["bytes"])
            commits.add(SpanMeta.from_row(row))
        commits.poll()
