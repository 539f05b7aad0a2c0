"""splitserve: LLM serving with prefill and decode on separate workers."""

from splitserve.engine.engine import LLMEngine, RequestOutput
from splitserve.engine.llm import LLM
from splitserve.engine.sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "RequestOutput", "SamplingParams"]
