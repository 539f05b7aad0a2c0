"""splitserve: LLM serving with prefill and decode on separate workers.

The engine names are imported lazily, so processes that only need the cluster or router
parts (Ray actors, the gRPC front end) do not pay for importing torch and the model code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from splitserve.engine.engine import LLMEngine, RequestOutput
    from splitserve.engine.llm import LLM
    from splitserve.engine.sampling_params import SamplingParams

_EXPORTS = {
    "LLM": "splitserve.engine.llm",
    "LLMEngine": "splitserve.engine.engine",
    "RequestOutput": "splitserve.engine.output",
    "SamplingParams": "splitserve.engine.sampling_params",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'splitserve' has no attribute {name!r}")
