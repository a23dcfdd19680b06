"""Serve deployment options come from cfg.serve (no Ray started)."""

from __future__ import annotations

import pytest

from mirage.config import load_config
from mirage.errors import MirageError


def test_fixed_replicas_and_autoscaling_from_config():
    from mirage.distributed.serve import deployment_options, make_app

    fixed = load_config("demo", ["serve.replicas=2", "serve.max_replicas=2", "serve.cpus_per_replica=0.5"])
    opts = deployment_options(fixed)
    assert opts["num_replicas"] == 2 and "autoscaling_config" not in opts
    assert opts["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 0.0}

    paper = load_config("paper")
    opts = deployment_options(paper)
    auto = opts["autoscaling_config"]
    assert (auto["min_replicas"], auto["max_replicas"]) == (paper.serve.replicas, paper.serve.max_replicas)
    assert opts["ray_actor_options"]["num_gpus"] == paper.serve.gpus_per_replica == 1.0
    assert opts["max_ongoing_requests"] == paper.serve.max_ongoing_requests
    make_app(paper, "models:/mirage@champion")  # Serve validates the options when building the deployment


def test_app_builder_needs_a_model():
    from mirage.distributed.serve import build_app

    with pytest.raises(MirageError, match="model"):
        build_app({"config": "demo"})
    build_app({"model": "models:/mirage@champion", "config": "paper", "overrides": ["serve.max_replicas=3"]})


def test_the_proxy_timeout_backs_up_the_replica_timeout():
    from mirage.distributed.serve import http_options

    cfg = load_config("demo", ["serve.request_timeout_s=7.5", "serve.port=8123"])
    opts = http_options(cfg)
    assert opts == {"host": "127.0.0.1", "port": 8123, "request_timeout_s": 15.0}
    from ray.serve.config import HTTPOptions

    assert HTTPOptions(**opts).request_timeout_s == 15.0
