"""An experiment declared in YAML: methods x a grid of config overrides x seeds, the splits it is
scored on and what its report shows.

    name: fig2c
    base: {train.epochs: 15}                 # dotted overrides of every trial
    methods:                                 # default: one model method, "mirage"
      mirage: {overrides: {}}
      linear: {kind: baseline, baseline: native_linear}
    grid:                                    # cartesian product, dotted keys as --set takes them
      model.modalities: [[text], [audio], [text, audio]]
    seeds: [0, 1]                            # train.seed of each model trial
    splits: [val, s07, ood]                  # scored where the dataset has fMRI for them
    report: {figures: [bars, maps]}
    demo: {seeds: [0], base: {train.epochs: 2}}   # applied on the embedded default (the demo preset)

Every grid point x seed of a model method is one trial; a baseline method is fitted once per grid
point (it has no seed). The demo block replaces the fields it names (``base`` is merged key by key).
Presets ship as package data (``mirage/presets/experiments/<name>.yaml``); any YAML path works too.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mirage.config import Config, ConfigError, config_keys, preset_names, preset_path
from mirage.documents import read_mapping

EXPERIMENT_FOLDER = "experiments"
"""Experiment presets: ``mirage/presets/experiments/<name>.yaml``."""

SPLITS = ("val", "s07", "ood")
"""Splits an experiment scores: ``val`` (Friends S06, ``data.val``), ``s07`` (Friends S07) and ``ood`` (the
out-of-distribution movies); a split is scored only where the dataset holds its fMRI."""
SPLIT_SELECTORS = {"s07": ["friends:s7"], "ood": ["ood:*"]}
"""Stimulus selectors of the test splits (``val`` is ``data.val``)."""

FIGURES = ("bars", "maps", "networks", "difference", "timecourses", "probes", "attention", "dominance")
"""What a report can draw: ``bars`` mean r per table row (SEM over subjects), ``maps`` per-parcel r per
subject and mean of the best row, ``networks`` mean r per Yeo-7 network, ``difference`` the parcel map of one
method minus another, ``timecourses`` measured vs predicted on one validation run, ``probes`` per-stage linear
probes, ``attention`` layer attention profiles, ``dominance`` the modality whose single-modality model
predicts each parcel best (a grid over ``model.modalities``)."""

SEED_KEY = "train.seed"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Method(_Strict):
    """One compared method."""

    kind: Literal["model", "baseline"] = Field("model", description="A trained MIRAGE model, or a ridge baseline.")
    baseline: str = Field("", description="kind=baseline: a name of mirage.baselines.BASELINES.")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Dotted config overrides of this method.")
    seeds: list[int] | None = Field(None, description="kind=model: this method's seeds; None = the experiment's.")
    ensemble: bool = Field(
        False, description="Also score the equal-weight mean of this method's seed trials at each grid point."
    )
    description: str = Field("", description="One line shown in the report.")

    @model_validator(mode="after")
    def _baseline_named(self) -> "Method":
        if self.kind == "baseline" and not self.baseline:
            raise ValueError("kind 'baseline' needs 'baseline: <name>' (official-challenge, native_linear)")
        if self.kind == "model" and self.baseline:
            raise ValueError(f"'baseline: {self.baseline}' given for kind 'model'; set kind: baseline")
        if self.kind == "baseline" and (self.ensemble or self.seeds is not None):
            raise ValueError("a baseline has no seeds (it is fitted once per grid point); drop 'seeds' and 'ensemble'")
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds)):
            raise ValueError(f"seeds {self.seeds}: expected distinct seeds, at least one")
        return self


class ReportSpec(_Strict):
    """What the report of the experiment shows (every report has the table and ceiling-normalised r)."""

    figures: list[Literal[FIGURES]] = Field(
        default_factory=lambda: ["bars", "maps", "timecourses"], description="Figures drawn (mirage.experiments.spec.FIGURES)."
    )
    compare: list[str] = Field(
        default_factory=list,
        description="Two method names [a, b]: the networks figure shows both, the difference map a minus b.",
    )
    map_views: list[Literal["glass", "surface"]] = Field(
        default_factory=lambda: ["glass"], description="Views of every brain map (glass brain, fsaverage surface)."
    )

    @field_validator("compare")
    @classmethod
    def _two(cls, v: list[str]) -> list[str]:
        if v and len(v) != 2:
            raise ValueError(f"expected two method names [a, b], got {v}")
        return v


class Variant(_Strict):
    """Fields replaced on the embedded default (``demo:``); ``base`` entries are merged over the spec's."""

    base: dict[str, Any] | None = None
    methods: dict[str, Method] | None = None
    grid: dict[str, list[Any]] | None = None
    seeds: list[int] | None = None
    splits: list[Literal[SPLITS]] | None = None
    report: ReportSpec | None = None
    description: str | None = None


class ExperimentSpec(_Strict):
    """A declared experiment (see the module docstring)."""

    name: str = Field(description="Experiment name: MLflow parent run name, Tune folder, `mirage experiment run NAME`.")
    description: str = Field("", description="What the experiment shows.")
    base: dict[str, Any] = Field(default_factory=dict, description="Dotted overrides applied to every trial.")
    methods: dict[str, Method] = Field(default_factory=lambda: {"mirage": Method()}, description="Compared methods.")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="Dotted key -> values; the cartesian product.")
    seeds: list[int] = Field(default_factory=lambda: [0], description="train.seed of every model trial.")
    splits: list[Literal[SPLITS]] = Field(default_factory=lambda: ["val"], description="Splits scored (where fMRI exists).")
    report: ReportSpec = Field(default_factory=ReportSpec, description="Tables and figures.")
    demo: Variant | None = Field(None, description="Smaller version used on the embedded default (demo preset).")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"expected letters, digits, '_', '.', '-' (at most 64, starting with a letter or digit), got {v!r}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "ExperimentSpec":
        _check_consistent(self)
        return self

    def variant(self, demo: bool) -> "ExperimentSpec":
        """This spec, with the ``demo`` block applied when ``demo`` (and there is one); no block left either way."""
        tree = self.model_dump(exclude={"demo"})
        if demo and self.demo is not None:
            for k, v in self.demo.model_dump(exclude_none=True).items():
                tree[k] = {**tree["base"], **v} if k == "base" else v
        return ExperimentSpec.model_validate(tree)

    def yielding_base(self, keys: Sequence[str]) -> "ExperimentSpec":
        """This spec without the ``base`` entries of ``keys`` (the user's ``--set`` keys win over the spec's
        base; grid points, methods and seeds still win over ``--set``)."""
        drop = set(keys)
        return self.model_copy(update={"base": {k: v for k, v in self.base.items() if k not in drop}})

    def trials(self) -> list["TrialPlan"]:
        """Every trial: method x grid point x seed (a baseline once per grid point), in a stable order."""
        keys = list(self.grid)
        points = [dict(zip(keys, combo)) for combo in itertools.product(*(self.grid[k] for k in keys))]
        out = []
        for mname, method in self.methods.items():
            for point in points:
                seeds: list[int | None] = list(method.seeds or self.seeds) if method.kind == "model" else [None]
                for seed in seeds:
                    over = {**self.base, **point, **method.overrides}
                    if seed is not None:
                        over[SEED_KEY] = seed
                    out.append(TrialPlan(self.name, mname, method.kind, method.baseline, point, seed, over))
        return out

    def ensembles(self) -> list["EnsemblePlan"]:
        """The seed ensembles: one per grid point of each method with ``ensemble: true``."""
        out: dict[str, EnsemblePlan] = {}
        for t in self.trials():
            if t.kind == "model" and self.methods[t.method].ensemble:
                e = out.setdefault(t.group, EnsemblePlan(self.name, t.method, t.point, []))
                e.members.append(t)
        return list(out.values())

    def check(self, cfg: Config) -> list["TrialPlan"]:
        """The trials, each checked to build a valid config over ``cfg``.

        Raises:
            ConfigError: naming the trial and the override that fails.
        """
        trials = self.trials()
        for t in trials:
            try:
                cfg.with_overrides(t.overrides)
            except ConfigError as e:
                raise ConfigError(f"experiment {self.name!r}, trial {t.key}: {e}") from None
        return trials


def _check_consistent(spec: ExperimentSpec) -> None:
    where = f"experiment {spec.name!r}"
    if not spec.methods:
        raise ValueError(f"{where}: methods is empty; expected at least one method (default: mirage)")
    if not spec.seeds:
        raise ValueError(f"{where}: seeds is empty; expected at least one seed")
    if len(set(spec.seeds)) != len(spec.seeds):
        raise ValueError(f"{where}: seeds {spec.seeds} repeat a seed")
    if not spec.splits:
        raise ValueError(f"{where}: splits is empty; expected some of {list(SPLITS)}")
    for key, values in spec.grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"{where}: grid.{key} is empty; expected a non-empty list of values")
    known = set(config_keys())
    named = [("base", k) for k in spec.base] + [("grid", k) for k in spec.grid]
    named += [(f"methods.{m}.overrides", k) for m, meth in spec.methods.items() for k in meth.overrides]
    for place, key in named:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.75)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{where}: {place}: unknown config key {key!r}{hint}")
        if key == SEED_KEY and place != "base":
            raise ValueError(f"{where}: {place} sets {SEED_KEY}; list seeds under 'seeds' instead")
    for m, meth in spec.methods.items():
        clash = sorted(set(meth.overrides) & set(spec.grid))
        if clash:
            raise ValueError(f"{where}: methods.{m}.overrides sets grid key(s) {clash}; a method may not fix a grid key")
        if not _NAME.match(m) or "+" in m:
            raise ValueError(f"{where}: method name {m!r}: expected letters, digits, '_', '.', '-'")
    for name in spec.report.compare:
        if name not in spec.methods:
            raise ValueError(f"{where}: report.compare names {name!r}, not one of the methods {sorted(spec.methods)}")


def short_key(key: str) -> str:
    """A grid key as a table column: its last dotted part (``model.modalities`` -> ``modalities``)."""
    return key.rsplit(".", 1)[-1]


def format_value(v: Any) -> str:
    """A grid value as a label: lists joined by '+', others as text."""
    if isinstance(v, (list, tuple)):
        return "+".join(map(str, v))
    return str(v)


def _point_label(point: dict[str, Any]) -> str:
    return ",".join(f"{short_key(k)}={format_value(v)}" for k, v in point.items())


@dataclass
class TrialPlan:
    """One trial of an experiment.

    Attributes:
        experiment: the experiment's name.
        method: method name; ``kind``: model or baseline; ``baseline``: its name (kind baseline).
        point: grid key -> value of this trial; ``seed``: train.seed (None for a baseline).
        overrides: every dotted override of the trial (base < grid point < method < seed).
    """

    experiment: str
    method: str
    kind: str
    baseline: str
    point: dict[str, Any]
    seed: int | None
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def group(self) -> str:
        """Method and grid point: the table row this trial belongs to (seeds are averaged in a row)."""
        label = _point_label(self.point)
        return f"{self.method}|{label}" if label else self.method

    @property
    def key(self) -> str:
        """Unique, readable id of the trial: ``method|grid point|seed=N``."""
        return self.group if self.seed is None else f"{self.group}|seed={self.seed}"

    @property
    def run_name(self) -> str:
        """Stable run (and Train folder) name: rerunning the trial reuses its checkpoints."""
        digest = hashlib.sha1(json.dumps([self.key, self.overrides], sort_keys=True, default=str).encode()).hexdigest()
        return f"{self.experiment}-{digest[:10]}"

    def to_dict(self) -> dict[str, Any]:
        return {"experiment": self.experiment, "method": self.method, "kind": self.kind, "baseline": self.baseline,
                "point": self.point, "seed": self.seed, "overrides": self.overrides}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrialPlan":
        return cls(**d)


@dataclass
class EnsemblePlan:
    """The equal-weight mean of one method's seed trials at one grid point."""

    experiment: str
    method: str
    point: dict[str, Any]
    members: list[TrialPlan]

    @property
    def group(self) -> str:
        label = _point_label(self.point)
        return f"{self.method}+ensemble|{label}" if label else f"{self.method}+ensemble"

    @property
    def key(self) -> str:
        return self.group

    @property
    def run_name(self) -> str:
        digest = hashlib.sha1(json.dumps([m.run_name for m in self.members]).encode()).hexdigest()
        return f"{self.experiment}-ens-{digest[:10]}"


# ------------------------------------------------------------------- loading


def spec_names() -> list[str]:
    """Names of the experiment presets shipped in the package."""
    return preset_names(EXPERIMENT_FOLDER)


def spec_path(name: str) -> Path:
    """An experiment preset name (``fig2c``) or a path to a YAML file."""
    return preset_path(name, EXPERIMENT_FOLDER, what="experiment")


def parse_spec(tree: dict[str, Any], source: str = "experiment") -> ExperimentSpec:
    """A spec from a mapping; every problem raised as one ConfigError naming ``source`` and the key."""
    try:
        return ExperimentSpec.model_validate(tree)
    except ValidationError as e:
        msgs = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                fields = _fields_at(err["loc"][:-1])
                close = difflib.get_close_matches(str(err["loc"][-1]), fields, n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                msgs.append(f"unknown key {loc!r} (expected one of {fields}){hint}")
            else:
                msg = str(err["msg"]).removeprefix("Value error, ")
                msgs.append(f"{loc}: {msg}" if loc else msg)
        raise ConfigError(f"invalid experiment ({source}): " + "; ".join(msgs)) from None


def _fields_at(loc: tuple) -> list[str]:
    """Field names of the spec model at a validation location (for unknown-key messages)."""
    model: type[BaseModel] = ExperimentSpec
    nested = {"methods": Method, "report": ReportSpec, "demo": Variant}
    for part in loc:
        if isinstance(part, str) and part in nested and model in (ExperimentSpec, Variant):
            model = nested[part]
    return sorted(model.model_fields)


def load_spec(name: str, demo: bool = False) -> ExperimentSpec:
    """Load an experiment preset or YAML file; with ``demo``, its demo block applied.

    Raises:
        ConfigError: unknown name, missing file, unknown key, empty grid list or seeds, bad method.
    """
    path = spec_path(name)
    spec = parse_spec(read_mapping(path, ConfigError), source=str(path))
    return spec.variant(demo)
