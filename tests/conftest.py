"""Shared fixtures: one loaded model (and one HF oracle) per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from splitserve.config import EngineConfig
from splitserve.engine.engine import LoadedModel
from splitserve.engine.llm import LLM
from splitserve.engine.model_files import default_model_path

# Prompts of varied length and kind, shared by the equivalence tests.
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away, there lived a dragon who",
    "List three colors:",
    "Explain why the sky is blue in one paragraph. Use simple words that a child would understand.",
    "import numpy as np\nimport torch\n\nclass Model(torch.nn.Module):\n    def __init__(self):",
    "Q: What is 12 times 7?\nA:",
    "<|im_start|>user\nWrite a haiku about autumn leaves.<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    return default_model_path()


@pytest.fixture(scope="session")
def loaded() -> LoadedModel:
    return LoadedModel.load(EngineConfig())


@pytest.fixture(scope="session")
def llm(loaded: LoadedModel) -> LLM:
    return LLM(loaded=loaded)


@pytest.fixture
def make_llm(loaded: LoadedModel):
    """An LLM with other engine settings, sharing the session's weights."""

    def make(**engine_args: object) -> LLM:
        return LLM(loaded=loaded, **engine_args)

    return make


@pytest.fixture(scope="session")
def hf_model(gguf_path: Path):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    return model.eval()
