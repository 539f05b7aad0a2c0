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


def test_a_fraction_of_a_cpu_per_worker_runs_more_workers_than_cores():
    three = ClusterConfig(mode="disaggregated", num_decode_workers=2, cpus_per_worker=0.5).worker_configs(2, 0)
    assert [(c.num_threads, c.ray_cpus) for c in three] == [(1, 0.5)] * 3  # 1.5 of 2 CPUs
    whole = ClusterConfig(num_workers=2).worker_configs(4, 0)
    assert [(c.num_threads, c.ray_cpus) for c in whole] == [(2, 2)] * 2  # as before: the CPUs split evenly
    assert ClusterConfig(num_workers=2, cpus_per_worker=3).worker_configs(2, 0)[0].num_threads == 3
    for bad in (0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="cpus_per_worker"):
            ClusterConfig(cpus_per_worker=bad)


@pytest.mark.parametrize("kwargs", [
    {"chunk_tokens": ()}, {"chunk_tokens": (64, 0)}, {"margin_sigmas": -1.0}, {"correction_weight": 0.0},
    {"correction_bounds": (1.5, 2.0)}, {"tail_quantile": 0.3}, {"tail_window": 0},
])
def test_bad_placement_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        PlacementConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [{"timeout_s": 3.0}, {"timeout_s": 0.0}, {"ttl_s": 1.0}])
def test_a_store_call_must_give_up_before_the_membership_it_renews_lapses(kwargs):
    with pytest.raises(ValueError, match="timeout_s < ttl_s"):
        StoreConfig(**kwargs)


@pytest.mark.parametrize("value", ["int4", "INT8", "", "none"])
def test_a_bad_quantization_is_a_sentence_naming_the_choices(value):
    with pytest.raises(ValueError, match=rf"quantization must be one of int8 or None .*got {value!r}"):
        EngineConfig(quantization=value)


@pytest.mark.parametrize("value", ["false", 0, None])
def test_enforce_eager_takes_a_bool_only(value):
    with pytest.raises(ValueError, match=rf"enforce_eager must be True or False, got {value!r}"):
        EngineConfig(enforce_eager=value)


def test_weights_stay_in_dtype_unless_asked():
    assert EngineConfig().quantization is None and EngineConfig().dtype == "float32"
    assert EngineConfig(quantization="int8", dtype="bfloat16").quantization == "int8"
