"""Shared fixtures: one loaded model per test session (loading dequantizes ~100 MB)."""

from __future__ import annotations

from pathlib import Path

import pytest

from splitserve.engine.loader import default_model_path


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    return default_model_path()
