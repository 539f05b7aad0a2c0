"""LLM: the offline API, ``LLM(model=None).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from splitserve.config import EngineConfig, SpeculativeConfig
from splitserve.engine.engine import LLMEngine, LoadedModel, RequestOutput
from splitserve.engine.sampling_params import SamplingParams

_SPEC_FIELDS = {f.name for f in dataclasses.fields(SpeculativeConfig)} - {"proposer"}

Prompt = str | Sequence[int]
Message = dict[str, str]


class LLM:
    """Runs prompts to completion on one in-process engine.

    ``model`` is a GGUF file or an HF folder (None: the default SmolLM2-135M-Instruct).
    ``proposer`` ("ngram", "draft" or "layer_skip") turns on speculative decoding; keyword
    arguments that are SpeculativeConfig fields configure it, the rest are EngineConfig fields.
    ``loaded`` / ``draft`` reuse models already in memory.
    """

    def __init__(
        self,
        model: str | None = None,
        proposer: str | None = None,
        loaded: LoadedModel | None = None,
        draft: LoadedModel | None = None,
        **engine_args: object,
    ):
        spec_args = {k: engine_args.pop(k) for k in list(engine_args) if k in _SPEC_FIELDS}
        if spec_args and proposer is None:
            raise ValueError(f"{', '.join(spec_args)} need a proposer (ngram, draft or layer_skip)")
        speculative = SpeculativeConfig(proposer, **spec_args) if proposer else None  # type: ignore[arg-type]
        config = EngineConfig(model=model, speculative=speculative, **engine_args)  # type: ignore[arg-type]
        self.engine = LLMEngine(config, loaded, draft)
        self.tokenizer = self.engine.tokenizer

    def generate(
        self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        """Generate for every prompt (a string, a token-id list, or a list of either).

        All prompts are validated before any runs, so one bad prompt fails the call cleanly.
        """
        batch = _as_batch(prompts)
        if params is None or isinstance(params, SamplingParams):
            param_list = [params or SamplingParams()] * len(batch)
        else:
            param_list = list(params)
            if len(param_list) != len(batch):
                raise ValueError(f"got {len(param_list)} SamplingParams for {len(batch)} prompts")
        ids = []
        try:
            for prompt, p in zip(batch, param_list):
                ids.append(self.engine.add_request(prompt, p))
        except ValueError:
            for request_id in ids:
                self.engine.abort(request_id)
            raise
        return self._run(ids)

    def chat(
        self, messages: Sequence[Message] | Sequence[Sequence[Message]], params: SamplingParams | None = None
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (or a list of them) and generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(list(c)) for c in conversations]  # type: ignore[arg-type]
        return self.generate([self.tokenizer.encode(p, add_special_tokens=False) for p in prompts], params)

    def _run(self, ids: list[str]) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        while len(finished) < len(ids):
            for output in self.engine.step():
                if output.finished:
                    finished[output.request_id] = output
        return [finished[i] for i in ids]


def _as_batch(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    items = list(prompts)
    if items and all(isinstance(t, int) for t in items):
        return [items]  # one prompt given as token ids
    return items
