"""Deployment.start waits for the resources its workers need, bounded, on the session's Ray:
a cluster that may still grow (one it joined) gets ``resource_wait_s``, one that cannot (one
this process started) fails at once, each with a sentence naming what is missing."""

from __future__ import annotations

import asyncio
import time

import pytest

from splitserve.cluster.deployment import Deployment
from splitserve.config import ClusterConfig
from splitserve.errors import CapacityError
from splitserve.worker_actor import WorkerActor

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("may_grow", [True, False])
def test_workers_wait_for_resources_no_node_offers_then_fail_with_a_sentence(ray_cluster, may_grow):
    config = ClusterConfig(num_workers=1, num_threads=1, decode_resources={"splitserve_nowhere": 1},
                           resource_wait_s=1.0)
    deployment = Deployment(config, WorkerActor)
    started = time.monotonic()
    with pytest.raises(CapacityError, match=r"need 1 splitserve_nowhere \(the Ray cluster has 0 free of 0\)") as e:
        asyncio.run(deployment.start(cluster_may_grow=may_grow))
    waited = time.monotonic() - started
    assert ("after 1 s of waiting" in str(e.value)) == may_grow
    assert waited >= 1.0 if may_grow else waited < 1.0
    assert not deployment.handles  # nothing was created
