"""Train / val / test splits from stimulus selectors in the config.

A selector is ``<source>:<what>`` where source is friends, movie10 or ood and
``what`` is ``*`` (all), a group (Friends season ``s1``, a movie ``life``) or a
stimulus id (``s06e01a``, ``life01``). Defaults (the paper): train = Friends
S1-S5 + Movie10, val = S06, test = S07 + OOD. Stimuli named in ``data.skip_runs`` are
left out of every split, for every subject.
"""

from __future__ import annotations

from mirage.config import ConfigError, DataConfig
from mirage.data.layout import SOURCES, FmriRun, Release, group_of, source_of
from mirage.errors import DataError

SPLITS = ("train", "val", "test")


def _selectors(cfg: DataConfig, name: str) -> list[tuple[str, str]]:
    if name not in SPLITS:
        raise ConfigError(f"split {name!r}: expected one of {SPLITS}")
    out = []
    for sel in getattr(cfg, name):
        source, sep, what = sel.partition(":")
        if not sep or source not in SOURCES or not what:
            raise ConfigError(f"data.{name}: selector {sel!r}, expected '<source>:<group|id|*>' with source in {SOURCES}")
        out.append((source, what))
    return out


def matches(selectors: list[tuple[str, str]], source: str, group: str, stimulus_id: str) -> bool:
    """Whether a stimulus is selected by any selector."""
    return any(s == source and w in ("*", group, stimulus_id) for s, w in selectors)


def split_stimuli(release: Release, cfg: DataConfig, name: str) -> list[str]:
    """Sorted ids of the stimuli on disk selected by ``cfg.<name>``, less ``cfg.skip_runs``."""
    sel = _selectors(cfg, name)
    skip = set(cfg.skip_runs)
    return sorted(
        sid for sid, st in release.stimuli().items() if sid not in skip and matches(sel, st.source, st.group, sid)
    )


def split_runs(release: Release, cfg: DataConfig, name: str) -> list[FmriRun]:
    """fMRI runs of ``cfg.subjects`` whose stimulus is in the split and not in ``cfg.skip_runs``,
    subject by subject in key order.

    Raises DataError naming the h5 file, key and expected video path when a selected run's
    stimulus video is missing.
    """
    sel = _selectors(cfg, name)
    skip = set(cfg.skip_runs)
    stimuli = release.stimuli()
    out: list[FmriRun] = []
    for sub in cfg.subjects:
        for run in release.fmri_runs(sub):
            if run.stimulus_id in skip:
                continue
            st = stimuli.get(run.stimulus_id)
            if st is None:
                try:
                    src, grp = run.source or source_of(run.stimulus_id), group_of(run.stimulus_id)
                except DataError:
                    continue
                if matches(sel, src, grp, run.stimulus_id):
                    raise DataError(
                        f"{run.path}: run {run.key!r} has no stimulus; expected video "
                        f"{release.expected_video(run.stimulus_id, src)}"
                    )
                continue
            if matches(sel, st.source, st.group, st.id):
                out.append(run)
    return out
