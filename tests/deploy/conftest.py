"""The chart rendered once per test session for its defaults and each ci/ values file."""

from __future__ import annotations

from typing import Any

import pytest

from tests.deploy.manifests import CASES, case_values, documents, load_renderer


@pytest.fixture(scope="session")
def renderer():
    pytest.importorskip("helm_python", reason="helm-python-sdk (the test extra) renders the chart")
    return load_renderer()


@pytest.fixture(scope="session")
def _rendered(renderer) -> dict[str, list[dict[str, Any]]]:
    return {case: documents(renderer.render(case_values(case))) for case in CASES}


@pytest.fixture(params=CASES)
def case(request) -> str:
    return request.param


@pytest.fixture
def docs(_rendered, case) -> list[dict[str, Any]]:
    return _rendered[case]
