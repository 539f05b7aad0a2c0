"""ClusterConfig's worker counts and ids per mode, and PlacementConfig's checks."""

from __future__ import annotations

import pytest

from splitserve.config import ClusterConfig, EngineConfig, PlacementConfig, SpeculativeConfig, StoreConfig


@pytest.mark.parametrize(("kwargs", "counts"), [
    ({}, {"prefill": 1, "decode": 1}),  # elastic, the default: two workers split in half
    ({"num_workers": 3}, {"prefill": 1, "decode": 2}),
    ({"num_workers": 1}, {"prefill": 0, "decode": 1}),
    ({"num_workers": 4, "num_prefill_workers": 3}, {"prefill": 3, "decode": 1}),
    ({"num_decode_workers": 2, "num_prefill_workers": 0}, {"prefill": 0, "decode": 2}),
    ({"mode": "disaggregated"}, {"prefill": 1, "decode": 1}),
    ({"mode": "disaggregated", "num_prefill_workers": 2}, {"prefill": 2, "decode": 1}),
    ({"mode": "colocated"}, {"colocated": 1}),
    ({"mode": "colocated", "num_workers": 2}, {"colocated": 2}),
])
def test_worker_counts_per_mode(kwargs, counts):
    assert ClusterConfig(**kwargs).worker_counts() == counts


def test_elastic_workers_are_named_for_their_place_not_their_role_and_all_may_decode():
    speculative = EngineConfig(speculative=SpeculativeConfig("ngram"))
    config = ClusterConfig(num_workers=3, store=StoreConfig(prefix="p"), decode_engine=speculative)
    configs = config.worker_configs(num_cpus=3, num_gpus=0)
    assert [(c.worker_id, c.kind) for c in configs] == [("p.worker-0", "prefill"), ("p.worker-1", "decode"),
                                                        ("p.worker-2", "decode")]
    assert all(c.engine == speculative and c.num_threads == 1 for c in configs)
    fixed = ClusterConfig(mode="disaggregated", store=StoreConfig(prefix="p"), decode_engine=speculative)
    assert [(c.worker_id, c.engine.speculative is not None) for c in fixed.worker_configs(2, 0)] == [
        ("p.prefill-0", False), ("p.decode-0", True)]


@pytest.mark.parametrize("kwargs", [
    {"chunk_tokens": ()}, {"chunk_tokens": (64, 0)}, {"margin_sigmas": -1.0}, {"correction_weight": 0.0},
    {"correction_bounds": (1.5, 2.0)}, {"tail_quantile": 0.3}, {"tail_window": 0},
])
def test_bad_placement_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        PlacementConfig(**kwargs)
