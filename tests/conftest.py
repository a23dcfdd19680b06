"""Shared fixtures: one small test config, a synthetic dataset and a feature store per session."""

from __future__ import annotations

import os

import pytest

from mirage.config import Config, load_config, resolve_paths

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

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

# ---- feature fixtures (feature store) ----------------------------------------

# ---- model / training fixtures -----------------------------------------------

# ---- sweep / ensemble fixtures -----------------------------------------------

# ---- serving fixtures ----------------------------------------------------------
