"""The one typed config tree of the platform.

Every command, job and Tune trial builds its configuration the same way:

    cfg = load_config("demo", ["model.n_queries=8", "train.epochs=2"])

A preset (a YAML file shipped in ``mirage/presets/``, or any path) is merged over the field
defaults, then each ``section.key=value`` override is applied in order; the
result is validated as a whole. Unknown keys are rejected with their dotted
path; values are type-checked. Field defaults are the published MIRAGE setup;
the ``demo`` preset shrinks it to a tiny CPU run.

Paths left empty are derived from ``outputs`` by :func:`resolve_paths`, and all
paths become absolute there (jobs run from an unpacked copy of the project and
Tune changes each trial's working directory).
"""

from __future__ import annotations

import copy
import difflib
import os
import types
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from mirage.documents import read_mapping
from mirage.errors import MirageError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PRESET_PACKAGE = "mirage"
PRESET_FOLDER = "presets"
"""Presets ship as package data: ``mirage/presets/<name>.yaml``."""
DEFAULT_PRESET = "demo"

SUBJECTS = ("sub-01", "sub-02", "sub-03", "sub-05")
MODALITIES = ("vision", "audio", "text")
"""The modalities, in the order of the feature store's modality axis (axis 1 of every stored feature
array). The one definition of the modality names and of every modality order below."""
MODALITY_AXIS = {m: i for i, m in enumerate(MODALITIES)}
"""Modality -> its index on the feature store's modality axis."""
FUSION_ORDER = MODALITIES[::-1]
"""The order in which the model concatenates modalities: text, audio, vision (the reference's), the
store's order reversed. ``model.modalities`` is a subset written in this order."""


class ConfigError(MirageError):
    """A config file, preset or override is invalid; the message names the key."""


class Section(BaseModel):
    """Base of every config section: strict, unknown keys rejected, validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


# --------------------------------------------------------------------------- data


class SynthConfig(Section):
    """Synthetic dataset written in the Algonauts 2025 layout (tests, demo, benchmarks)."""

    seasons: list[int] = Field(
        default_factory=lambda: [1, 2, 6, 7], description="Friends seasons written (train seasons, 6 = val, 7 = test)."
    )
    episodes: int = Field(2, ge=1, description="Episodes per Friends season; each has splits a and b.")
    movies: list[str] = Field(
        default_factory=lambda: ["bourne", "life"], description="Movie10 movies written (life/figures get _run-1/_run-2 keys)."
    )
    ood_movies: list[str] = Field(
        default_factory=lambda: ["chaplin", "pulpfiction"], description="OOD movies written (chaplin has no transcript)."
    )
    seconds: float = Field(60.0, gt=0, description="Duration of every stimulus run in seconds.")
    parcels: int = Field(1000, ge=1, description="Number of parcels in the fMRI files.")
    fps: float = Field(10.0, gt=0, description="Video frame rate of the written mkv files.")
    width: int = Field(64, ge=16, description="Video width in pixels (even).")
    height: int = Field(48, ge=16, description="Video height in pixels (even).")
    sample_rate: int = Field(16000, ge=8000, description="Audio sample rate of the written mkv files.")
    channels: int = Field(1, ge=1, le=2, description="Audio channel count of the written mkv files.")
    snr: float = Field(1.0, gt=0, description="Signal-to-noise ratio (variance) of the planted fMRI signal.")
    planted_fraction: float = Field(
        0.6, ge=0, le=1, description="Fraction of parcels driven by a stimulus property; the rest is noise."
    )
    segment_min_s: float = Field(
        3.0, gt=0, description="Shortest segment over which a planted stimulus property stays constant (s)."
    )
    segment_max_s: float = Field(
        8.0, gt=0, description="Longest segment over which a planted stimulus property stays constant (s)."
    )
    seed: int = Field(0, description="Seed of everything random in the synthetic dataset.")
    planted_network: Literal["", "Vis", "SomMot", "DorsAttn", "SalVentAttn", "Limbic", "Cont", "Default"] = Field(
        "", description="Yeo-7 network (Vis, SomMot, DorsAttn, SalVentAttn, Limbic, Cont, Default) whose parcels "
        "alone carry the planted signal (planted_fraction of them); empty = planted parcels drawn from all parcels."
    )
    atlas_voxel_mm: float = Field(
        4.0, gt=0, description="Voxel size (mm) of the synthetic Schaefer-like atlas written for every subject."
    )


class DataConfig(Section):
    """Where the Algonauts 2025 dataset is and how it is cut into samples."""

    root: str = Field("", description="Dataset directory in the release layout; empty = <outputs>/data.")
    subjects: list[str] = Field(default_factory=lambda: list(SUBJECTS), description="Subjects, in head order.")
    n_parcels: int = Field(1000, ge=1, description="Parcels per fMRI sample (Schaefer 1000).")
    tr: float = Field(1.49, gt=0, description="Repetition time of the fMRI in seconds.")
    train: list[str] = Field(
        default_factory=lambda: ["friends:s1", "friends:s2", "friends:s3", "friends:s4", "friends:s5", "movie10:*"],
        description="Stimulus selectors of the training split ('<source>:<season|movie|*>').",
    )
    val: list[str] = Field(default_factory=lambda: ["friends:s6"], description="Selectors of the validation split.")
    test: list[str] = Field(
        default_factory=lambda: ["friends:s7", "ood:*"], description="Selectors of the test split (no fMRI released)."
    )
    window_trs: int = Field(100, ge=1, description="Training window length in TRs (100 TRs = 149 s).")
    stride_trs: int = Field(100, ge=1, description="Stride between training windows in TRs.")
    hrf_delay_trs: int = Field(3, ge=0, description="Stimulus window starts this many TRs before the fMRI window.")
    zscore: bool = Field(True, description="z-score the fMRI per parcel per run.")
    max_length_mismatch_trs: int = Field(
        5, ge=0, description="Largest tolerated difference between fMRI and stimulus length in TRs; a larger one is "
        "an error in `mirage data check` and in training (mirage.data.fmri.reconcile_lengths)."
    )
    skip_runs: list[str] = Field(
        default_factory=lambda: ["s04e01a", "s04e01b", "s04e13b", "s05e20a", "s06e03a"],
        description="Stimulus ids left out of every split for every subject. Default (the reference's): s06e03a "
        "and the runs missing for one subject (sub-02 s05e20a; sub-05 s04e01a, s04e01b, s04e13b).",
    )
    synthetic: bool = Field(
        False,
        description="The dataset is the platform's synthetic one: a local sweep writes it to data.root when "
        "missing. False: a missing or empty data.root is an error (point it to the release).",
    )
    noise_ceiling: str = Field(
        "", description="Per-parcel noise ceiling file (.npy array of n_parcels, or .tsv with n_parcels values, one "
        "per line); empty = the synthetic truth's, else split-half from repeated runs, else none (mirage.brain.ceiling)."
    )
    noise_ceiling_min: float = Field(
        0.1, ge=0, le=1, description="Parcels whose noise ceiling is below this get no ceiling-normalised r (NaN)."
    )
    synth: SynthConfig = Field(default_factory=SynthConfig, description="Synthetic dataset parameters.")


# ----------------------------------------------------------------------- features


class TinyBackboneConfig(Section):
    """A randomly initialised Qwen3-Omni thinker of the real architecture, tiny sizes."""

    n_layers: int = Field(4, ge=1, description="Transformer layers of the text model.")
    hidden: int = Field(64, ge=8, description="Width of the text model (feature dim).")
    heads: int = Field(4, ge=1, description="Attention heads of the text model.")
    kv_heads: int = Field(2, ge=1, description="Key/value heads of the text model.")
    experts: int = Field(4, ge=1, description="Mixture-of-experts experts per layer.")
    experts_per_token: int = Field(2, ge=1, description="Experts routed per token.")
    vocab_size: int = Field(512, ge=64, description="Vocabulary of the locally trained tokenizer.")
    vision_depth: int = Field(2, ge=1, description="Vision encoder blocks.")
    vision_hidden: int = Field(32, ge=8, description="Vision encoder width.")
    audio_layers: int = Field(2, ge=1, description="Audio encoder layers.")
    audio_hidden: int = Field(32, ge=8, description="Audio encoder width.")
    encoder_heads: int = Field(2, ge=1, description="Attention heads of the vision and audio encoders.")
    ffn_mult: int = Field(2, ge=1, description="Feed-forward expansion of every block (and of each expert).")
    patch_size: int = Field(16, ge=2, description="Vision patch size in pixels (frames resize to multiples of 2x this).")
    video_max_pixels: int = Field(64 * 64, ge=64, description="Largest frame area (pixels) after the video processor's resize.")
    mel_bins: int = Field(128, ge=8, description="Mel bins of the audio feature extractor.")
    seed: int = Field(0, description="Seed of the random weights.")


class FeaturesConfig(Section):
    """Stimulus-to-feature extraction and the feature store."""

    store: str = Field("", description="Feature store root; empty = <outputs>/features.")
    backbone: Literal[
        "qwen3-omni", "qwen3-omni-30b-a3b-thinking", "qwen3-omni-30b-a3b-instruct", "qwen3-omni-30b-a3b-captioner",
        "qwen2.5-omni-3b", "qwen2.5-omni-7b", "tiny", "tiny-qwen2.5-omni",
    ] = Field(
        "qwen3-omni",
        description="Backbone registry name (mirage.features.backbone.BACKBONES): a published checkpoint's "
        "family and id, or a tiny random variant built locally (tiny = Qwen3-Omni, tiny-qwen2.5-omni).",
    )
    model_id: str = Field("Qwen/Qwen3-Omni-30B-A3B-Thinking", description="Checkpoint id or local path.")
    revision: str = Field("main", description="Checkpoint revision, recorded in the store key.")
    local_files_only: bool = Field(
        True, description="Load the checkpoint from the local Hugging Face cache or path only (no download race)."
    )
    fusion: Literal["native", "posthoc"] = Field(
        "native",
        description="native: one pass per cutoff with video, audio (inside the video block) and transcript "
        "together; posthoc: each modality alone through the backbone (the reference's --context-modalities m).",
    )
    rate_hz: float = Field(2.0, gt=0, description="Rate of extraction cutoffs (feature frames per second).")
    video_seconds: float = Field(4.0, gt=0, description="Video context before each cutoff in seconds.")
    video_fps: float = Field(2.0, gt=0, description="Frame rate at which video context is sampled.")
    max_frames: int = Field(8, ge=1, description="At most this many video frames per pass.")
    video_min_pixels: int | None = Field(
        None, ge=1, description="Smallest frame area after the processor's resize; None = the processor call's "
        "default (Qwen3-Omni: 131072, as the reference extracts)."
    )
    video_max_pixels: int | None = Field(
        None, ge=1, description="Largest frame area after the processor's resize; None = the processor call's "
        "default (Qwen3-Omni: 786432)."
    )
    audio_seconds: float = Field(60.0, gt=0, description="Audio context before each cutoff in seconds.")
    audio_rate: int = Field(16000, description="Audio sample rate fed to the backbone.")
    audio_decode_rate: int = Field(
        44100, gt=0, description="Rate of the int16 stereo PCM the track is decoded to before resampling to audio_rate."
    )
    media_tolerance_s: float = Field(
        1.0, ge=0, description="A movie whose video or audio packets end more than this many seconds before the "
        "container's duration is truncated or corrupt: `mirage data check` and extraction reject it, and decoding "
        "repeats no frame and pads no silence beyond it (shorter gaps are the encoders' own and kept, as the "
        "reference does). Not in the store key: it changes no stored number."
    )
    max_words: int = Field(1024, ge=0, description="At most this many transcript words per pass (at least 1 is kept).")
    transcript_tr: float = Field(
        1.49, gt=0, description="Seconds per transcript row: text lasts max(rows x this, last word end)."
    )
    dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="Backbone dtype on GPU.")
    actors: int = Field(1, ge=1, description="Ray Data actor pool size (backbone replicas).")
    gpus_per_actor: float = Field(1.0, ge=0, description="GPUs per extraction actor (0 on CPU).")
    cpus_per_actor: float = Field(1.0, ge=0, description="Logical CPUs per extraction actor.")
    batch_size: int = Field(1, ge=1, description="Work items per actor call.")
    cutoffs_per_item: int = Field(
        32, ge=1, description="Passes (distinct cutoffs: 2 Hz steps and word ends) in one work item of one stimulus."
    )
    pass_batch: int = Field(
        1, ge=1, description="Passes with equal audio windows run through the backbone together in one padded "
        "forward (the same features within float tolerance)."
    )
    torch_threads: int = Field(0, ge=0, description="CPU threads of torch per extraction process; 0 = torch default.")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each extraction actor requests (e.g. {gpu_group: 1}), so actors land on "
        "the worker group that offers them.",
    )
    assemble_cpus: float = Field(
        1.0, gt=0, description="Logical CPUs of the Ray task that joins a stimulus's spans into its stored array "
        "(it runs on a worker: a head offering no CPUs never takes it)."
    )
    lease_seconds: float = Field(
        60.0, gt=0, description="Lease of the store's single writer (a file on the shared volume, renewed every "
        "third of this); a writer that died leaves a lease another may take over once it has expired."
    )
    tiny: TinyBackboneConfig = Field(default_factory=TinyBackboneConfig, description="The tiny backbone.")


# -------------------------------------------------------------------------- model


class ModelConfig(Section):
    """MIRAGE architecture (DESIGN section 5).

    Feature dim and layer count come from the feature store, output TRs from ``data.window_trs``,
    parcels and subjects from the data, as in the reference builder.
    """

    modalities: list[Literal[FUSION_ORDER]] = Field(
        default_factory=lambda: list(FUSION_ORDER),
        description="Modalities fed to the model: a subset of text, audio, vision written in that order, the "
        "fusion order (mirage.config.FUSION_ORDER, the reference's). Another order is refused, not reordered, so "
        "that a saved model never changes meaning.",
    )
    layers: list[int] | None = Field(None, description="Backbone layers fed to the model (indices); None = all.")
    layer_pool: Literal["cross_attention", "mean", "concat", "self_attention"] = Field(
        "cross_attention",
        description="How each modality's layer stack becomes one vector per frame before its projection: "
        "'cross_attention' (MIRAGE: learned queries attend over the layers; reference layer_cross_attn), 'mean' "
        "(all-layers mean; reference mean), 'concat' (layers concatenated; reference cat), 'self_attention' (one "
        "pre-norm transformer layer over the layer tokens, the deepest model.self_attention_tokens outputs kept; "
        "reference layer_self_attn). Layer attention exists only for 'cross_attention'.",
    )
    self_attention_tokens: int = Field(
        1, ge=1, description="layer_pool='self_attention': deepest layer tokens whose outputs are kept (reference: 1)."
    )
    self_attention_ff_mult: int = Field(
        4, ge=1, description="layer_pool='self_attention': feed-forward expansion of the layer transformer (reference: 4)."
    )
    n_queries: int = Field(24, ge=1, description="Learned latent queries per modality.")
    pooler_heads: int = Field(4, ge=1, description="Heads of the layer cross-attention.")
    pooler_dropout: float = Field(0.2, ge=0, lt=1, description="Attention dropout of the layer cross-attention.")
    query_init_std: float = Field(0.02, gt=0, description="Std of the query initialisation.")
    hidden_dim: int = Field(3072, ge=3, description="Fused width (projection per modality = hidden_dim // n_mod).")
    modality_dropout: float = Field(0.3, ge=0, lt=1, description="Probability of zeroing a whole modality.")
    modality_dropout_per: Literal["sample", "batch"] = Field(
        "batch",
        description="How modality dropout is drawn in training: 'sample' for each window independently; 'batch' "
        "once per batch (on each rank), zeroing the same modalities in every window (reference). At least one "
        "modality is always kept.",
    )
    depth: int = Field(8, ge=1, description="Transformer blocks of the brain encoder.")
    heads: int = Field(8, ge=1, description="Attention heads of the brain encoder.")
    ff_mult: int = Field(4, ge=1, description="Feed-forward expansion of the brain encoder.")
    attn_dropout: float = Field(0.0, ge=0, lt=1, description="Attention dropout of the brain encoder.")
    ff_dropout: float = Field(0.0, ge=0, lt=1, description="Feed-forward dropout of the brain encoder.")
    max_time_len: int = Field(1024, ge=1, description="Rows of the learned time position table.")
    time_init_std: float = Field(
        1.0, gt=0, description="Std of the time position table initialisation (reference: 1.0, a standard normal)."
    )
    head_init: Literal["uniform", "normal"] = Field(
        "normal",
        description="Subject head initialisation, D = fused width: 'uniform' weights U(-D^-1/2, D^-1/2) and bias 0; "
        "'normal' weights and bias N(0, std D^-1/2) (reference).",
    )
    rotary_base: float = Field(10000.0, gt=1, description="Base of the rotary frequencies (first dim_head // 2 channels).")

    @field_validator("modalities")
    @classmethod
    def _modalities_unique(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"expected one or more distinct modalities, got {v}")
        ordered = [m for m in FUSION_ORDER if m in v]
        if v != ordered:
            raise ValueError(f"expected the modalities in the fusion order {list(FUSION_ORDER)}, got {v}; write {ordered}")
        return v

    @field_validator("layers")
    @classmethod
    def _layers_unique(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or len(set(v)) != len(v)):
            raise ValueError(f"expected None or distinct layer indices, got {v}")
        return v


# ----------------------------------------------------------------------- training


class BaselineConfig(Section):
    """Ridge baselines: the official Algonauts 2025 challenge recipe, applied to our feature store."""

    hrf_delay_trs: int = Field(3, ge=0, description="Features end this many TRs before the predicted fMRI TR (official: 3).")
    stimulus_window: int = Field(
        5, ge=1, description="TRs of vision and audio features per fMRI TR (official: 5); text uses one TR."
    )
    excluded_edge_trs: int = Field(
        5, ge=0, description="fMRI TRs left out of training at the start and at the end of every run (official: 5)."
    )
    pca_components: int = Field(
        250, ge=1, description="PCA components per modality after a StandardScaler, fit on the train stimuli (official: 250)."
    )
    audio_pca_components: int | None = Field(
        None, ge=1,
        description="official-challenge audio components; None keeps them all (official: audio kept whole, PCA to its own width).",
    )
    pca_seed: int = Field(20200220, description="random_state of the PCA (official: 20200220).")
    alphas: list[float] = Field(
        default_factory=lambda: [1e6, 1e5, 1e4, 1e3, 100.0, 10.0, 1.0, 0.5, 0.1, 0.05, 0.01, 0.005, 1e-3, 1e-4, 1e-5],
        description="RidgeCV candidate alphas, one chosen per parcel by leave-one-out (official: these 15).",
    )
    challenge_layer: float = Field(
        1.0, ge=0, le=1,
        description="official-challenge: the one store layer per modality, as a fraction of depth (1.0 = last, "
        "as the official extractors read final representations).",
    )


class TrainConfig(Section):
    """Optimisation and Ray Train settings."""

    epochs: int = Field(15, ge=1, description="Training epochs.")
    batch_size: int = Field(16, ge=1, description="Global batch size (windows per optimiser step).")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate (AdamW, OneCycle).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    warmup_frac: float = Field(0.1, ge=0, lt=1, description="Fraction of steps warming up (OneCycle pct_start).")
    grad_clip: float = Field(1.0, gt=0, description="Gradient norm clipping.")
    seed: int = Field(33, description="Seed of initialisation, shuffling and dropout.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "fp16",
        description="Autocast of training and validation: auto = bf16 on GPU, none (fp32) on CPU; bf16; fp16 with "
        "dynamic loss scaling (torch.amp.GradScaler, also under FSDP2; the reference's '16-mixed'); "
        "fp32 = no autocast.",
    )
    selection_metric: Literal["per_subject", "pooled"] = Field(
        "pooled",
        description="Validation score that picks the best epoch, reported as val_r (both are logged every epoch, "
        "as val_r_per_subject and val_r_pooled): per_subject = mean over subjects of the mean over parcels of r "
        "over real fMRI rows; pooled = r per parcel over every row of every validation window of all subjects, "
        "rows past a run's end (zero fMRI) included, then the mean over parcels (reference).",
    )
    num_workers: int = Field(1, ge=1, description="Ray Train workers (FSDP2 ranks).")
    use_gpu: bool = Field(True, description="One GPU per worker.")
    cpus_per_worker: float = Field(1.0, ge=0, description="Logical CPUs per Train worker.")
    worker_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each Train worker requests (e.g. {train_group: 1}), so workers land on "
        "the worker group that offers them; a direct sweep trial, its own worker, requests them too.",
    )
    max_failures: int = Field(2, ge=0, description="Worker failures tolerated before the run fails.")
    name: str = Field("", description="Run name (storage folder); empty = derived from the config hash.")
    storage: str = Field("", description="Ray Train/Tune storage path; empty = <outputs>/ray_results.")
    loader_threads: int = Field(2, ge=0, description="Background threads prefetching batches.")
    input: Literal["memmap", "resident"] = Field(
        "memmap",
        description="Training-window reader: memmap = every window read from the feature store's memory maps "
        "(page cache), every rank draws from all runs; resident = each rank loads its shard of the training "
        "windows (the frames they cover, selected layers only) into memory once and slices windows there; "
        "shards are blocks of windows grouped by stimulus, sized so every window is seen once per epoch across "
        "ranks (with several ranks the global batches differ from memmap's). "
        "Both give bit-identical batches and losses on one rank; validation always reads memmaps.",
    )
    baseline: BaselineConfig = Field(default_factory=BaselineConfig, description="Ridge baselines.")


# ------------------------------------------------------------------- sweep / ensemble


class ParamSpec(Section):
    """One dimension of a search space, keyed by the same dotted path as ``--set``."""

    kind: Literal["int", "float", "loguniform", "choice"] = Field(description="Distribution type.")
    low: float | None = Field(None, description="Lower bound (int, float, loguniform).")
    high: float | None = Field(None, description="Upper bound (int, float, loguniform).")
    values: list[Any] | None = Field(None, description="Candidates (choice).")

    @model_validator(mode="after")
    def _bounds(self) -> "ParamSpec":
        if self.kind == "choice":
            if not self.values:
                raise ValueError("kind 'choice' needs a non-empty 'values' list")
        elif self.low is None or self.high is None or self.low > self.high:
            raise ValueError(f"kind {self.kind!r} needs low <= high, got low={self.low} high={self.high}")
        elif self.kind == "loguniform" and self.low <= 0:
            raise ValueError(f"kind 'loguniform' needs low > 0, got {self.low}")
        return self


class SweepConfig(Section):
    """Ray Tune + Optuna (TPE) + ASHA."""

    name: str = Field("mirage-sweep", description="Sweep name (Tune experiment folder and MLflow run name).")
    num_samples: int = Field(30, ge=1, description="Trials.")
    max_concurrent: int = Field(2, ge=1, description="Trials running at once.")
    metric: str = Field("val_r", description="Metric optimised.")
    mode: Literal["max", "min"] = Field("max", description="Direction of the metric.")
    grace_period: int = Field(3, ge=1, description="ASHA: epochs before a trial can be stopped.")
    reduction_factor: int = Field(3, ge=2, description="ASHA reduction factor.")
    seed: int = Field(0, description="Seed of the TPE sampler and of the fANOVA forest behind the parameter importance.")
    n_startup_trials: int = Field(10, ge=1, description="TPE random trials before modelling.")
    driver_cpus: float = Field(
        1.0, ge=0, description="Logical CPUs of each trainer trial's driver (its Train workers request their own; "
        "a direct trial reserves its worker's train.cpus_per_worker instead). Above 0, the driver never runs on a "
        "head that offers no CPUs (KubeRay's num-cpus: 0)."
    )
    driver_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each trainer trial's driver requests (e.g. {cpu_group: 1}), so it runs on "
        "the CPU worker group and is not lost with a (spot) GPU node; a direct trial requests "
        "train.worker_resources instead.",
    )
    trial_runner: Literal["auto", "direct", "trainer"] = Field(
        "auto",
        description="How a trial trains: 'direct' runs the training loop inside the Tune trial process (one "
        "worker, no Ray Train start-up; the trial reserves the worker's CPUs and GPU), 'trainer' starts a Ray "
        "Train TorchTrainer per trial (any train.num_workers), 'auto' is direct when train.num_workers is 1.",
    )
    space: dict[str, ParamSpec] = Field(
        default_factory=lambda: {
            "model.n_queries": ParamSpec(kind="choice", values=[8, 16, 24, 32]),
            "model.depth": ParamSpec(kind="int", low=2, high=10),
            "train.lr": ParamSpec(kind="loguniform", low=3e-5, high=3e-4),
            "model.pooler_dropout": ParamSpec(kind="float", low=0.0, high=0.4),
            "model.modality_dropout": ParamSpec(kind="float", low=0.0, high=0.5),
            "model.hidden_dim": ParamSpec(kind="choice", values=[1536, 3072]),
        },
        description="Search space: dotted config key -> distribution.",
    )


class EnsembleConfig(Section):
    """Ensembles of independently trained members, combined per parcel."""

    n_members: int = Field(15, ge=1, description="Members in all.")
    top_k: int = Field(5, ge=1, description="Best sweep configs used; members cycle seeds over them.")
    temperature: float = Field(0.3, gt=0, description="Softmax temperature over members' validation r.")
    epoch_predictions: bool = Field(
        True,
        description="Training logs every epoch's whole-run validation predictions (val_predictions/epoch_NNNN.npz), "
        "from which the ensemble's cross-fitted score chooses each member's epoch on one fold of the validation runs.",
    )
    registry_name: str = Field("mirage", description="Model Registry name of the ensemble.")
    alias: str = Field(
        "champion",
        description="Registry alias of the best ensemble: moved to a new version only when its held-out "
        "(cross-fitted) ensemble_r is at least the current holder's, or with ensemble.promote.",
    )
    promote: bool = Field(
        False, description="Move the alias to the new ensemble whatever its score (mirage sweep/ensemble --promote)."
    )
    analysis: bool = Field(
        True, description="Log interpretability artifacts (attention, ablations) of the best member."
    )


class TrackingConfig(Section):
    """MLflow."""

    uri: str = Field("", description="Tracking URI; empty = sqlite:///<outputs>/mlflow.db (absolute).")
    experiment: str = Field("mirage", description="MLflow experiment name.")
    system_metrics: bool = Field(
        True, description="Log system metrics (system/cpu_utilization_percentage, memory, disk, network, GPU) on "
        "every training run, sampled by MLflow's monitor in the process that opened the run."
    )
    system_metrics_interval_s: float = Field(
        10.0, gt=0, description="Seconds between system metric samples (each sample is logged as one step)."
    )


class RayConfig(Section):
    """How to reach (or start) Ray."""

    address: str = Field("", description="Cluster address ('auto', 'ray://...'); empty = start a local Ray.")
    num_cpus: int | None = Field(
        None, ge=1, description="Logical CPUs of a local Ray (more than physical cores on small machines)."
    )
    include_dashboard: bool = Field(True, description="Start the dashboard with a local Ray (on 127.0.0.1).")
    auth: Literal["token", "disabled"] = Field(
        "token",
        description="Authentication of a local Ray: 'token' (its gRPC and HTTP ports, which listen on every "
        "interface, refuse callers without the token); 'disabled' lets anyone on the network run code.",
    )
    auth_token_path: str = Field(
        "", description="Token file of a local Ray (owner-only permissions); empty = <outputs>/.ray/auth_token."
    )


class ServeConfig(Section):
    """Ray Serve prediction service."""

    host: str = Field("127.0.0.1", description="Bind address of the HTTP proxy.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    replicas: int = Field(1, ge=1, description="Initial replicas.")
    max_replicas: int = Field(1, ge=1, description="Autoscaling upper bound.")
    max_batch_size: int = Field(8, ge=1, description="@serve.batch size.")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="@serve.batch wait.")
    max_payload_mb: float = Field(64.0, gt=0, description="Largest request body accepted.")
    max_uncompressed_mb: float = Field(
        256.0, gt=0, description="Largest features array a posted .npy/.npz may declare, uncompressed (checked from its header)."
    )
    max_json_kb: float = Field(64.0, gt=0, description="Largest JSON request body (/v1/predict).")
    extra_trs: int = Field(
        10, ge=0,
        description="TRs a request may ask for past those its feature frames span (fMRI runs can outlast the stimulus).",
    )
    request_timeout_s: float = Field(
        60.0, gt=0,
        description="Seconds a replica gives one request, body upload included, before answering 408; "
        "the HTTP proxy drops it after twice that.",
    )
    gpus_per_replica: float = Field(0.0, ge=0, description="GPUs per replica (and per batch prediction actor).")
    cpus_per_replica: float = Field(1.0, ge=0, description="Logical CPUs per replica (and per batch prediction actor).")
    max_ongoing_requests: int = Field(32, ge=1, description="Requests a replica accepts at once (queued into batches).")
    target_ongoing_requests: float = Field(
        4.0, gt=0, description="Autoscaling target: ongoing requests per replica before scaling up."
    )
    window_batch: int = Field(16, ge=1, description="Windows per forward pass of the predictor.")
    io_threads: int = Field(
        2, ge=1,
        description="Threads of a Serve replica that decode request bodies and encode responses, off its event loop.",
    )
    predict_actors: int = Field(1, ge=1, description="Ray Data actor pool size of batch prediction (`mirage predict`).")


# --------------------------------------------------------------------------- root


class Config(Section):
    """The whole configuration of a platform run."""

    outputs: str = Field("outputs", description="Folder for every output whose path is left empty.")
    data: DataConfig = Field(default_factory=DataConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    ensemble: EnsembleConfig = Field(default_factory=EnsembleConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    @field_validator("outputs")
    @classmethod
    def _outputs_not_empty(cls, v: str) -> str:
        if not v:
            raise ValueError("outputs must name a folder")
        return v

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON-serialisable)."""
        return self.model_dump(mode="json")

    def flat(self) -> dict[str, Any]:
        """Dotted key -> value, for MLflow params."""
        return flatten(self.to_dict())

    def with_overrides(self, overrides: dict[str, Any] | list[str]) -> "Config":
        """A validated copy with dotted overrides applied (``{"a.b": 1}`` or ``["a.b=1"]``)."""
        tree = self.to_dict()
        items = _parse_overrides(overrides) if isinstance(overrides, list) else list(overrides.items())
        for key, value in items:
            _set_dotted(tree, key, value)
        return _validate(tree, source="overrides")

    def dump(self, path: str | os.PathLike) -> None:
        """Write the config as YAML (readable back by :func:`load_config`)."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


# ---------------------------------------------------------------------- loading


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {dotted key: leaf}."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and not key.startswith("sweep.space"):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """``["a.b=raw", ...]`` -> ``[("a.b", value), ...]``, each value converted by its field's type."""
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r}: empty key")
        out.append((key, _convert(key, raw, _field_annotation(key))))
    return out


_NULL = {"", "null", "none", "~"}
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _field_annotation(key: str) -> Any:
    """The type annotation of the field at dotted ``key``; ``Any`` inside open mappings.

    Raises ConfigError naming the unknown key (with the nearest known one).
    """
    model: type[BaseModel] = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            raise ConfigError(f"unknown config key {'.'.join(parts[: i + 1])!r}, in override {key}{_did_you_mean(key)}")
        ann = field.annotation
        if i == len(parts) - 1:
            return ann
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            if get_origin(ann) is dict:
                return Any  # an open mapping (sweep.space): entries are YAML
            raise ConfigError(f"config key {'.'.join(parts[: i + 1])!r} is not a section, in override {key}")
        model = ann
    return Any


def _convert(key: str, raw: str, ann: Any) -> Any:
    """The override string ``raw`` as a value of type ``ann``: str stays str, int/float/bool parse
    strictly, ``X | None`` takes ``null``, anything else (lists, mappings, unions) is read as YAML."""
    origin = get_origin(ann)
    if origin in (Union, types.UnionType):
        arms = [a for a in get_args(ann) if a is not type(None)]
        if len(arms) < len(get_args(ann)) and raw.strip().lower() in _NULL:
            return None
        if len(arms) == 1:
            return _convert(key, raw, arms[0])
    elif ann is str:
        return raw
    elif origin is Literal and all(isinstance(a, str) for a in get_args(ann)):
        choices = list(get_args(ann))
        if raw not in choices:
            hint = _did_you_mean(raw, choices)
            raise ConfigError(f"invalid value {raw!r}, in override {key}; expected one of {choices}{hint}")
        return raw
    elif ann is bool:
        word = raw.strip().lower()
        if word in _TRUE or word in _FALSE:
            return word in _TRUE
        raise ConfigError(f"invalid value {raw!r}, in override {key}; expected a boolean (true or false)")
    elif ann is int:
        try:
            return int(raw.strip())
        except ValueError:
            raise ConfigError(f"invalid value {raw!r}, in override {key}; expected an integer") from None
    elif ann is float:
        try:
            return float(raw.strip())
        except ValueError:
            raise ConfigError(f"invalid value {raw!r}, in override {key}; expected a number") from None
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid value {raw!r}, in override {key}; expected YAML ({e.__class__.__name__})") from None


def config_keys(model: type[BaseModel] | None = None, prefix: str = "") -> list[str]:
    """Every dotted key of the config tree, sections included (``data``, ``data.synth``, ``data.tr``)."""
    out = []
    for name, field in (model or Config).model_fields.items():
        out.append(prefix + name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += config_keys(ann, f"{prefix}{name}.")
    return out


def _did_you_mean(name: str, candidates: list[str] | None = None) -> str:
    """``"; did you mean 'x'?"`` for the closest candidate (config keys by default), else ``""``."""
    close = difflib.get_close_matches(name, candidates if candidates is not None else config_keys(), n=1, cutoff=0.75)
    return f"; did you mean {close[0]!r}?" if close else ""


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    if key.startswith("sweep.space."):  # search-space names are dotted config keys themselves
        tree["sweep"]["space"][key[len("sweep.space."):]] = value
        return
    parts = key.split(".")
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"unknown config key {'.'.join(parts[: i + 1])!r}, in override {key}{_did_you_mean(key)}")
        node = node[part]
    if not isinstance(node, dict):
        raise ConfigError(f"config key {'.'.join(parts[:-1])!r} is not a section (in override {key})")
    leaf = parts[-1]
    # dict-valued fields (sweep.space) accept new keys; sections do not
    if leaf not in node and not _is_open_mapping(parts[:-1]):
        raise ConfigError(f"unknown config key {key!r}, in override {key}{_did_you_mean(key)}")
    node[leaf] = value


def _is_open_mapping(path: list[str]) -> bool:
    """Whether the field at ``path`` is a mapping with free keys (``sweep.space``, ``train.worker_resources``),
    not a section."""
    model: type[BaseModel] = Config
    for i, part in enumerate(path):
        field = model.model_fields.get(part)
        if field is None:
            return False
        ann = field.annotation
        if get_origin(ann) is dict:
            return i == len(path) - 1
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return False
        model = ann
    return False


def _merge(base: dict[str, Any], over: dict[str, Any], where: str = "", source: str = "") -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        key = f"{where}{k}"
        if k not in out and not _is_open_mapping(where.rstrip(".").split(".") if where else []):
            raise ConfigError(f"unknown config key {key!r}, in {source or 'config'}{_did_you_mean(key)}")
        if isinstance(v, dict) and isinstance(out.get(k), dict) and not _is_open_mapping(key.split(".")):
            out[k] = _merge(out[k], v, key + ".", source)
        else:
            out[k] = v
    return out


def _validate(tree: dict[str, Any], source: str) -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        msgs = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                msgs.append(f"unknown config key {loc!r}{_did_you_mean(loc)}")
            else:
                msgs.append(f"{loc}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError(f"invalid config ({source}): " + "; ".join(msgs)) from None


def preset_names(subfolder: str = "") -> list[str]:
    """Names of the YAML presets shipped in the package (``demo``, ``paper``; below ``subfolder`` if given)."""
    folder = resources.files(PRESET_PACKAGE).joinpath(PRESET_FOLDER, *filter(None, [subfolder]))
    return sorted(f.name[: -len(".yaml")] for f in folder.iterdir() if f.name.endswith(".yaml"))


def preset_path(name: str, subfolder: str = "", what: str = "preset") -> Path:
    """A preset name (``demo``; looked up below ``subfolder``) or a path to a YAML file; ``what`` names it in errors."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"{what} file {p} not found")
        return p
    cand = resources.files(PRESET_PACKAGE).joinpath(PRESET_FOLDER, *filter(None, [subfolder]), f"{name}.yaml")
    if not cand.is_file():
        known = preset_names(subfolder)
        hint = _did_you_mean(name, known)
        raise ConfigError(f"unknown {what} {name!r}; expected a YAML path or one of {known}{hint}")
    return Path(str(cand))


def load_config(preset: str | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Build the config: field defaults < preset YAML < overrides; validated; paths not yet resolved."""
    tree = Config().to_dict()
    path = preset_path(preset or DEFAULT_PRESET)
    loaded = read_mapping(path, ConfigError)
    tree = _merge(tree, loaded, source=f"config file {path}")
    cfg = _validate(tree, source=str(path))
    if overrides:
        cfg = cfg.with_overrides(overrides)
    return cfg


def resolve_paths(cfg: Config, base: str | os.PathLike | None = None) -> Config:
    """Fill empty paths from ``outputs`` and make every path absolute (relative to ``base`` or cwd)."""
    base_dir = Path(base) if base is not None else Path.cwd()
    out = (base_dir / os.path.expanduser(cfg.outputs)).resolve()

    def absolute(p: str, default: Path) -> str:
        return str((base_dir / os.path.expanduser(p)).resolve()) if p else str(default)

    upd: dict[str, Any] = {
        "outputs": str(out),
        "data.root": absolute(cfg.data.root, out / "data"),
        "features.store": absolute(cfg.features.store, out / "features"),
        "train.storage": absolute(cfg.train.storage, out / "ray_results"),
        "ray.auth_token_path": absolute(cfg.ray.auth_token_path, out / ".ray" / "auth_token"),
    }
    uri = cfg.tracking.uri or f"sqlite:///{out / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str((base_dir / uri[len("sqlite:///"):]).resolve())
    upd["tracking.uri"] = uri
    return cfg.with_overrides(upd)
