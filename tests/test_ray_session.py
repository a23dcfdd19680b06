"""``ray_session``: Ray for a block, shut down at its end only when the block started it."""

from __future__ import annotations

import pytest
import ray

from mirage.distributed.cluster import init_ray, ray_session

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_a_session_shuts_down_only_the_ray_it_started(test_cfg):
    cfg = test_cfg.with_overrides({"ray.num_cpus": 1, "ray.include_dashboard": False}).ray
    assert not ray.is_initialized()
    with ray_session(cfg, start=False):
        pass
    assert not ray.is_initialized()  # a block that needs no Ray starts none

    with pytest.raises(RuntimeError, match="inside the block"):
        with ray_session(cfg):
            assert ray.is_initialized()
            with ray_session(cfg):  # joins the running Ray
                assert ray.get(ray.remote(lambda: 1).remote()) == 1
            assert ray.is_initialized()  # the inner block left the outer block's Ray running
            raise RuntimeError("inside the block")
    assert not ray.is_initialized()  # shut down on an error too

    with ray_session(cfg, start=False):
        init_ray(cfg)  # started by a call inside the block (as run_training, run_extract do)
        assert ray.is_initialized()
    assert not ray.is_initialized()
