"""Shared fixtures: one small test config, a synthetic dataset and a feature store per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from mirage.config import Config, load_config, resolve_paths


# A dataset small enough to write, extract and train on in seconds on 2 cores.
TEST_OVERRIDES = [
    "data.synth.seasons=[1, 6, 7]",
    "data.synth.episodes=1",
    "data.synth.movies=[life]",
    "data.synth.ood_movies=[chaplin, pulpfiction]",
    "data.synth.seconds=40",
    "data.synth.parcels=32",
    "data.n_parcels=32",
    "data.window_trs=8",
    "data.stride_trs=8",
]


@pytest.fixture(scope="session")
def outputs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("outputs")


@pytest.fixture(scope="session")
def test_cfg(outputs_dir) -> Config:
    """The demo preset shrunk for tests, every output under a session temp folder."""
    return resolve_paths(load_config("demo", TEST_OVERRIDES + [f"outputs={outputs_dir}"]))


# ---- data fixtures (data layer) ----------------------------------------------


@pytest.fixture(scope="session")
def synth_root(test_cfg):
    """The synthetic test dataset, written once per session to ``test_cfg.data.root``."""
    from pathlib import Path

    from mirage.data.synth import write_synthetic

    root = Path(test_cfg.data.root)
    if not (root / "_truth" / "truth.json").is_file():
        write_synthetic(root, test_cfg.data.synth, tr=test_cfg.data.tr)
    return root


@pytest.fixture
def synth_copy(synth_root, tmp_path):
    """A private copy of the synthetic test dataset (without its ground truth) that a test may change or break."""
    import shutil

    root = tmp_path / "ds"
    shutil.copytree(synth_root, root, ignore=shutil.ignore_patterns("_truth"))
    return root


# ---- feature fixtures (feature store) ----------------------------------------


@pytest.fixture(scope="session")
def feature_store(test_cfg, synth_root):
    """The test dataset extracted once (tiny backbone, in-process); the opened FeatureStore."""
    from mirage.features.extract import extract_all
    from mirage.features.store import open_store

    cfg = test_cfg.with_overrides({"data.root": str(synth_root)})
    result = extract_all(cfg)
    if result.failed:
        raise RuntimeError(f"feature extraction of the test dataset failed: {result.failed}")
    return open_store(cfg.features)


# ---- model / training fixtures -----------------------------------------------

CONFORMANCE_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "conformance"


@pytest.fixture(scope="session")
def conformance_dir() -> Path:
    """The reference conformance fixtures (``../shared/conformance``); skips where absent."""
    if not (CONFORMANCE_DIR / "tiny_a" / "model.safetensors").is_file():
        pytest.skip(f"reference conformance fixtures not found at {CONFORMANCE_DIR.resolve()}")
    return CONFORMANCE_DIR.resolve()


FEATURES_FIXTURE = CONFORMANCE_DIR / "features_tiny"


def features_fixture_cfg(fx: Path, fusion: str = "native") -> Config:
    """The paper preset on the feature fixture's tiny thinker (float32, CPU)."""
    return load_config("paper", [
        f"features.model_id={fx / 'model'}", "features.dtype=float32", "features.gpus_per_actor=0",
        f"features.fusion={fusion}",
    ])


@pytest.fixture(scope="session")
def features_fixture() -> Path:
    """The reference's extraction fixture (``../shared/conformance/features_tiny``); skips where absent."""
    if not (FEATURES_FIXTURE / "model" / "model.safetensors").is_file():
        pytest.skip(f"feature conformance fixture not found at {FEATURES_FIXTURE.resolve()}")
    return FEATURES_FIXTURE.resolve()


@pytest.fixture(scope="session")
def fixture_backbone(features_fixture):
    """The fixture's tiny Qwen3-Omni thinker, loaded once per session."""
    from mirage.features.backbone import load_backbone

    return load_backbone(features_fixture_cfg(features_fixture).features)


@pytest.fixture(scope="session")
def fixture_native_features(features_fixture, fixture_backbone) -> dict:
    """Our native-fusion features of the fixture stimulus: modality -> (n_frames, n_layers, dim)."""
    from mirage.features.one import extract_video

    fx = features_fixture
    cfg = features_fixture_cfg(fx)
    return extract_video(cfg, fx / "stimulus.mkv", fx / "stimulus.tsv", backbone=fixture_backbone)


@pytest.fixture(scope="session")
def train_cfg(test_cfg, synth_root, feature_store) -> Config:
    """``test_cfg`` on the extracted synthetic dataset, for training tests (Ray runs on CPU)."""
    return test_cfg.with_overrides({"data.root": str(synth_root), "train.use_gpu": False})


# ---- sweep / ensemble fixtures -----------------------------------------------

# ---- serving fixtures ----------------------------------------------------------


def _random_export(cfg, store, out: Path, seed: int) -> Path:
    """A randomly initialised model of ``cfg.model`` exported like a trained one."""
    import torch

    from mirage.config import MODALITIES
    from mirage.model import build_model, save_exported

    torch.manual_seed(seed)
    dims = {m: (store.n_layers, store.dim) for m in MODALITIES}
    model = build_model(cfg.model, dims, cfg.data.n_parcels, len(cfg.data.subjects), cfg.data.window_trs)
    return save_exported(out, model.eval(), cfg, {"feature_key": store.key})


@pytest.fixture(scope="session")
def serve_cfg(test_cfg, synth_root):
    """``test_cfg`` pointing at the session's synthetic dataset."""
    return test_cfg.with_overrides({"data.root": str(synth_root)})


@pytest.fixture(scope="session")
def exported_model(serve_cfg, feature_store, tmp_path_factory) -> Path:
    """An exported (untrained, seeded) model on the session feature store."""
    return _random_export(serve_cfg, feature_store, tmp_path_factory.mktemp("serve") / "model", seed=1)


@pytest.fixture(scope="session")
def ensemble_model(serve_cfg, feature_store, tmp_path_factory) -> Path:
    """A two-member ensemble directory with per-subject, per-parcel weights."""
    import numpy as np

    from mirage.ensemble import write_ensemble_dir

    base = tmp_path_factory.mktemp("ensemble")
    members = [_random_export(serve_cfg, feature_store, base / f"m{i}", seed=10 + i) for i in range(2)]
    rng = np.random.default_rng(0)
    w = rng.uniform(0.1, 1.0, (2, len(serve_cfg.data.subjects), serve_cfg.data.n_parcels))
    w = (w / w.sum(axis=0, keepdims=True)).astype(np.float32)
    return write_ensemble_dir(base / "ensemble", members, w, list(serve_cfg.data.subjects), {"temperature": 0.3})


# ---- multi-node fixtures -------------------------------------------------------

SIM_GPU_NODES = 3  # two for the work, one spare that takes over when a node is killed


@pytest.fixture(scope="module")
def sim_cluster(test_cfg):
    """A simulated multi-node Ray cluster (:class:`mirage.distributed.sim_cluster.SimCluster`) with this
    process as the driver on its head (no CPUs for work), ``SIM_GPU_NODES`` worker nodes of the
    ``gpu_group`` (1 slot, 2 CPUs each) and one ``cpu_group`` node (2 CPUs, where work that asks only
    for CPUs may land); stopped, every process with it, at the end of the module."""
    from mirage.distributed.sim_cluster import CPU_GROUP, GPU_GROUP, SimCluster

    sim = SimCluster(test_cfg.ray).start()
    try:
        for _ in range(SIM_GPU_NODES):
            sim.add_node(GPU_GROUP, slots=1, cpus=2)
        sim.add_node(CPU_GROUP, slots=2, cpus=2)
        sim.connect()
        yield sim
    finally:
        sim.shutdown()
