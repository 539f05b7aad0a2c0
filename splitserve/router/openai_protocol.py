"""OpenAI's wire format for completions and chat completions, as pure functions (no I/O).

``completion_input`` and ``chat_input`` turn a request body (parsed JSON) into a
``GenerateInput`` plus the ``ReplyOptions`` the answer needs, raising ValueError with a sentence
for what splitserve cannot serve; ``Reply`` writes ``GenerateDelta``s back as OpenAI's chunks and
responses; ``error_body`` is OpenAI's error object. ``http_server`` does the I/O.

Accepted beyond OpenAI's fields (as vLLM): ``top_k`` (-1: off), ``ignore_eos``,
``stop_token_ids``, ``skip_special_tokens``, ``num_speculative_tokens``, ``slo_ttft_ms``,
``slo_tpot_ms`` and ``stream_options.continuous_usage_stats`` (with ``include_usage``: every
streamed chunk carries the usage so far, so a client counts each chunk's tokens). Other unknown fields are ignored, as vLLM does, so clients that send extras
work. Fields that would change the output in ways splitserve does not implement (n > 1, echo,
logprobs, penalties, logit_bias, tools...) are refused unless they hold their neutral value.
finish_reason is "stop", "length", or "abort" when the server aborted the request (as vLLM
sends; OpenAI's clients pass unknown values through).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from splitserve.engine.sampling_params import SamplingParams
from splitserve.protocol import SLO, GenerateDelta
from splitserve.router.api import GenerateInput

# OpenAI's chat default is "until the context is full"; the engine clamps max_tokens to the
# context left after the prompt, so a bound this large means exactly that.
CHAT_DEFAULT_MAX_TOKENS = 1 << 20

_SAMPLING_TYPES: dict[str, tuple[type, ...]] = {
    "max_tokens": (int,), "temperature": (int, float), "top_p": (int, float), "top_k": (int,), "seed": (int,),
    "ignore_eos": (bool,), "skip_special_tokens": (bool,), "num_speculative_tokens": (int,),
}
# field: the values that mean "not used", so clients that send them explicitly still work.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (None, 1), "best_of": (None, 1), "echo": (None, False), "logprobs": (None, False),
    "top_logprobs": (None, 0), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "repetition_penalty": (None, 1), "logit_bias": (None, {}), "suffix": (None, ""), "tools": (None, []),
    "tool_choice": (None, "none"), "response_format": (None, {"type": "text"}), "min_tokens": (None, 0),
}


@dataclass(frozen=True)
class ReplyOptions:
    """How the client wants the answer: streamed (SSE) or whole, with a usage chunk at the end
    and, with continuous_usage, the usage so far on every chunk (vLLM's extension)."""

    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False


def completion_input(body: Any, request_id: str | None = None) -> tuple[GenerateInput, ReplyOptions]:
    """A /v1/completions body as a GenerateInput; prompt: a string or a list of token ids (or a
    one-element list of either)."""
    body = _object(body)
    prompt: Any = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise ValueError(f"batched prompts are not supported: send one prompt per request, got {len(prompt)}")
    if isinstance(prompt, list) and not all(_is_int(t) for t in prompt):
        raise ValueError("prompt must be a string or a list of token ids")
    if isinstance(prompt, list) and not prompt:
        raise ValueError("prompt must not be empty")
    if not isinstance(prompt, (str, list)):
        raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
    return GenerateInput(
        params=sampling_params(body),
        prompt=prompt if isinstance(prompt, str) else None,
        prompt_token_ids=prompt if isinstance(prompt, list) else None,
        model=_model(body), request_id=request_id, slo=slo(body),
    ), reply_options(body)


def chat_input(body: Any, request_id: str | None = None) -> tuple[GenerateInput, ReplyOptions]:
    """A /v1/chat/completions body as a GenerateInput (the router applies the chat template).
    max_completion_tokens is max_tokens' newer name; without either the answer may fill the context."""
    body = _object(body)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    sampling = {**body, "max_tokens": CHAT_DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens}
    return GenerateInput(
        params=sampling_params(sampling), messages=messages(body.get("messages")),
        model=_model(body), request_id=request_id, slo=slo(body),
    ), reply_options(body)


def sampling_params(body: Mapping[str, Any]) -> SamplingParams:
    """SamplingParams from the body's fields; an absent or null field keeps the default."""
    for name, neutral in _NEUTRAL.items():
        value = body.get(name)
        # 0 == False in Python; a bool only matches a bool.
        if not any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in neutral):
            raise ValueError(f"{name}={value!r} is not supported by this server")
    values: dict[str, Any] = {}
    for name, types in _SAMPLING_TYPES.items():
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) != (types == (bool,)) or not isinstance(value, types):
            raise ValueError(f"{name} must be {' or '.join(t.__name__ for t in types)}, got {value!r}")
        values[name] = value
    if values.get("top_k") == -1:  # vLLM's "every token"
        del values["top_k"]
    stop = body.get("stop")
    if stop is not None:
        if not isinstance(stop, (str, list)):
            raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
        values["stop"] = stop
    if body.get("stop_token_ids") is not None:
        values["stop_token_ids"] = body["stop_token_ids"]
    return SamplingParams(**values)


def slo(body: Mapping[str, Any]) -> SLO:
    targets: dict[str, float | None] = {}
    for name in ("slo_ttft_ms", "slo_tpot_ms"):
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
            raise ValueError(f"{name} must be a positive number when given, got {value!r}")
        targets[name] = None if value is None else value / 1000
    return SLO(ttft_s=targets["slo_ttft_ms"], tpot_s=targets["slo_tpot_ms"])


def messages(value: Any) -> list[dict[str, str]]:
    """Chat turns as {"role", "content"} strings; content may be a list of text parts."""
    if not isinstance(value, list) or not value:
        raise ValueError("messages must be a non-empty list of {role, content} objects")
    turns = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"messages[{i}] must be an object with a string role")
        content = message.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ValueError(f"messages[{i}].content: only text parts are supported")
            content = "\n".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string or a list of text parts")
        turns.append({"role": message["role"], "content": content})
    return turns


def reply_options(body: Mapping[str, Any]) -> ReplyOptions:
    stream, options = body.get("stream") or False, body.get("stream_options")
    if not isinstance(stream, bool):
        raise ValueError(f"stream must be a boolean, got {stream!r}")
    if options is not None and not stream:
        raise ValueError("stream_options is only allowed when stream is true")
    if options is not None and not isinstance(options, dict):
        raise ValueError(f"stream_options must be an object, got {options!r}")
    include_usage = bool((options or {}).get("include_usage"))
    # As vLLM: continuous usage only comes with include_usage.
    continuous_usage = include_usage and bool((options or {}).get("continuous_usage_stats"))
    return ReplyOptions(stream=stream, include_usage=include_usage, continuous_usage=continuous_usage)


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ValueError("the request body must be a JSON object")
    return body


def _model(body: Mapping[str, Any]) -> str | None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ValueError(f"model must be a string, got {model!r}")
    return model or None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ------------------------------------------------------------------------ answers


def usage(delta: GenerateDelta) -> dict[str, int]:
    return {"prompt_tokens": delta.num_prompt_tokens, "completion_tokens": delta.num_output_tokens,
            "total_tokens": delta.num_prompt_tokens + delta.num_output_tokens}


def served_report(delta: GenerateDelta) -> dict[str, Any]:
    """``{"splitserve_report": {...}}`` on the last delta (how the request was served: workers,
    k history, phase seconds; serving.proto's RequestReport fields), else nothing. An extra
    field, which OpenAI clients ignore."""
    return {} if delta.report is None else {"splitserve_report": delta.report.wire_fields()}


@dataclass(frozen=True)
class Reply:
    """Writes one request's output as OpenAI's objects: text_completion(s) or chat.completion(s)."""

    is_chat: bool
    request_id: str
    model: str
    created: int
    include_usage: bool = False
    continuous_usage: bool = False

    @property
    def id(self) -> str:
        return f"{'chatcmpl' if self.is_chat else 'cmpl'}-{self.request_id}"

    def chunk(self, delta: GenerateDelta, is_first: bool) -> dict[str, Any]:
        """One SSE chunk. The first chat chunk carries the role with the first text, so a
        client's time to first chunk is its time to first token."""
        choice: dict[str, Any] = {"index": 0}
        if self.is_chat:
            choice["delta"] = {"role": "assistant", "content": delta.text} if is_first else {"content": delta.text}
        else:
            choice["text"] = delta.text
        choice |= {"logprobs": None, "finish_reason": delta.finish_reason if delta.finished else None}
        chunk = self._head("chat.completion.chunk" if self.is_chat else "text_completion") | {"choices": [choice]}
        chunk |= served_report(delta)
        if self.continuous_usage:
            return chunk | {"usage": usage(delta)}
        return chunk | {"usage": None} if self.include_usage else chunk

    def usage_chunk(self, last: GenerateDelta) -> dict[str, Any]:
        """The last chunk when stream_options.include_usage: no choices, the whole usage."""
        return self._head("chat.completion.chunk" if self.is_chat else "text_completion") | {
            "choices": [], "usage": usage(last)}

    def response(self, text: str, last: GenerateDelta) -> dict[str, Any]:
        """The whole answer of a request that did not stream."""
        choice: dict[str, Any] = {"index": 0}
        if self.is_chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice |= {"logprobs": None, "finish_reason": last.finish_reason}
        return self._head("chat.completion" if self.is_chat else "text_completion") | {
            "choices": [choice], "usage": usage(last)} | served_report(last)

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


def error_body(status: int, message: str) -> dict[str, Any]:
    """OpenAI's error object for an HTTP status."""
    kind, code = _ERROR_KINDS.get(status, ("invalid_request_error", None))
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


_ERROR_KINDS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    500: ("server_error", "internal_error"),
    503: ("server_error", "service_unavailable"),
}
