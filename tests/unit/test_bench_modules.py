"""Every benchmark module imports, and the deployments the load benchmarks start are valid
configurations (a benchmark that breaks when the library changes is caught here, not hours
into a run)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.parametrize("name", sorted(p.stem for p in BENCH.glob("*.py") if p.stem != "__init__"))
def test_a_bench_module_imports(name):
    importlib.import_module(f"bench.{name}")


def test_the_load_benchmarks_deployments_are_valid():
    from bench import disagg_load, serving_overhead

    for config in [*disagg_load.load_systems().values(), *serving_overhead.SYSTEMS.values()]:
        assert 1 <= sum(config.worker_counts().values()) <= 2  # this machine's 2 cores
