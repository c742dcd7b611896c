"""The `litellm` backend: remote providers (OpenAI, Anthropic, Bedrock, ...) through litellm.

litellm takes seconds to import and is an optional dependency (the `remote` extra), so it is
imported on the first call, never when this module is; its model cost map is read from the
local copy (`LITELLM_LOCAL_MODEL_COST_MAP`) so nothing is fetched from the network.
Remote providers take none of treadle's scheduling hints.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import AsyncIterator, Mapping
from types import ModuleType
from typing import Any

from treadle.backends.base import (
    BackendError,
    BackendTarget,
    Capabilities,
    LLMRequest,
    LLMResponse,
    StreamChunk,
    Usage,
    collect_stream,
)
from treadle.backends.openai_compat.backend import ToolCallAccumulator

INSTALL_HINT = "litellm is not installed; install it with: pip install 'treadle[remote]'"

#: HTTP statuses after which the same call may succeed later
_RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 529})


#: litellm's provider prefixes whose `gen_ai.provider.name` is spelled differently
_PROVIDERS = {
    "bedrock": "aws.bedrock",
    "azure": "azure.ai.openai",
    "azure_ai": "azure.ai.inference",
    "vertex_ai": "gcp.vertex_ai",
    "gemini": "gcp.gemini",
    "mistral": "mistral_ai",
    "xai": "x_ai",
    "watsonx": "ibm.watsonx.ai",
    "hosted_vllm": "vllm",
}


def litellm_target(model: str, api_base: Any = None) -> BackendTarget:
    """`openai/gpt-4o-mini` → provider "openai", model "gpt-4o-mini" (and the server of
    `api_base`, when given)."""
    prefix, sep, name = model.partition("/")
    provider = _PROVIDERS.get(prefix, prefix) if sep else "openai"
    address = port = None
    if isinstance(api_base, str) and api_base:
        import httpx

        url = httpx.URL(api_base)
        address, port = url.host or None, url.port or (443 if url.scheme == "https" else 80)
    return BackendTarget(
        provider=provider, model=name if sep else model, server_address=address, server_port=port
    )


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def load_litellm() -> ModuleType:
    """Import litellm (slow: do it only when a remote model is used)."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    try:
        import litellm
    except ImportError as exc:
        raise BackendError(INSTALL_HINT) from exc
    return litellm


class LiteLLMBackend:
    """A remote model through `litellm.acompletion`.

    `model` is litellm's model string (`openai/gpt-4o-mini`, `anthropic/claude-...`).
    `kwargs` go to every `acompletion` call (`api_base`, `api_key`, `num_retries`,
    `timeout`, provider options, ...); `api_key_env` names an environment variable to read
    the key from at call time, so keys stay out of workflow files.
    """

    def __init__(
        self,
        model: str,
        *,
        api_key_env: str | None = None,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        if importlib.util.find_spec("litellm") is None:  # cheap: does not import it
            raise ImportError(INSTALL_HINT)
        self.model = model
        self.api_key_env = api_key_env
        self.name = name or f"litellm:{model}"
        self.kwargs = kwargs
        self.target = litellm_target(model, kwargs.get("api_base"))

    def __repr__(self) -> str:
        return f"LiteLLMBackend({self.model!r})"

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(streaming=True, tool_calls=True)

    def build_call(
        self,
        request: LLMRequest,
        *,
        stream: bool,
        extra_headers: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """The keyword arguments of the `litellm.acompletion` call for `request`."""
        call: dict[str, Any] = {
            **self.kwargs,
            "model": self.model,
            "messages": [m.to_openai() for m in request.messages],
            "stream": stream,
        }
        if request.tools:
            call["tools"] = request.tools
        if request.tool_choice is not None:
            call["tool_choice"] = request.tool_choice
        if request.max_tokens is not None:
            call["max_tokens"] = request.max_tokens
        if request.temperature is not None:
            call["temperature"] = request.temperature
        if request.response_schema is not None:
            name = str(request.response_schema.get("title") or "output")
            call["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": name, "schema": request.response_schema},
            }
        if stream:
            call["stream_options"] = {"include_usage": True}
        if self.api_key_env is not None:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise BackendError(
                    f"{self.name}: environment variable {self.api_key_env} is not set"
                )
            call["api_key"] = key
        headers = {
            **(self.kwargs.get("extra_headers") or {}),
            **request.headers,
            **(extra_headers or {}),
        }
        if headers:
            call["extra_headers"] = headers
        return call

    async def generate(
        self, request: LLMRequest, *, extra_headers: Mapping[str, str] | None = None
    ) -> LLMResponse:
        if request.stream:
            # collect_stream measures the time to the first text or tool call
            folded = await collect_stream(self.stream(request, extra_headers=extra_headers))
            return folded.model_copy(update={"model": self.model, "replica": self.name})
        litellm = load_litellm()
        call = self.build_call(request, stream=False, extra_headers=extra_headers)
        try:
            response = await litellm.acompletion(**call)
        except Exception as exc:
            raise self._error(litellm, exc) from exc
        return self._parse(response)

    async def stream(
        self, request: LLMRequest, *, extra_headers: Mapping[str, str] | None = None
    ) -> AsyncIterator[StreamChunk]:
        litellm = load_litellm()
        call = self.build_call(request, stream=True, extra_headers=extra_headers)
        calls = ToolCallAccumulator(self.name)
        finish: str | None = None
        usage: Usage | None = None
        try:
            chunks = await litellm.acompletion(**call)
            async for chunk in chunks:
                raw_usage = getattr(chunk, "usage", None)
                if raw_usage:
                    usage = _usage(raw_usage)
                for choice in getattr(chunk, "choices", None) or []:
                    if getattr(choice, "index", 0) != 0:
                        continue
                    delta = getattr(choice, "delta", None)
                    for piece in getattr(delta, "tool_calls", None) or []:
                        function = getattr(piece, "function", None)
                        calls.add(
                            getattr(piece, "index", None),
                            id=getattr(piece, "id", None),
                            name=getattr(function, "name", None),
                            arguments=getattr(function, "arguments", None),
                        )
                    content = getattr(delta, "content", None)
                    if isinstance(content, str) and content:
                        yield StreamChunk(delta=content)
                    if getattr(choice, "finish_reason", None):
                        finish = str(choice.finish_reason)
        except BackendError:
            raise
        except Exception as exc:
            raise self._error(litellm, exc) from exc
        tool_calls = calls.calls()
        yield StreamChunk(
            tool_calls=tool_calls,
            finish_reason=finish or ("tool_calls" if tool_calls else "stop"),
            usage=usage or Usage(),
        )

    def _parse(self, response: Any) -> LLMResponse:
        choices = getattr(response, "choices", None)
        if not choices:
            raise BackendError(
                f"{self.name} returned no choices", retryable=True, replica=self.name
            )
        choice = choices[0]
        message = getattr(choice, "message", None)
        if message is None:
            raise BackendError(
                f"{self.name} returned a choice without a message", replica=self.name
            )
        calls = ToolCallAccumulator(self.name)
        for i, call in enumerate(getattr(message, "tool_calls", None) or []):
            function = getattr(call, "function", None)
            calls.add(
                i,
                id=getattr(call, "id", None),
                name=getattr(function, "name", None),
                arguments=getattr(function, "arguments", None),
            )
        tool_calls = calls.calls()
        content = getattr(message, "content", None)
        finish = getattr(choice, "finish_reason", None) or ("tool_calls" if tool_calls else "stop")
        return LLMResponse(
            content=content if isinstance(content, str) else None,
            tool_calls=tool_calls,
            finish_reason=str(finish),
            usage=_usage(getattr(response, "usage", None)),
            model=getattr(response, "model", None) or self.model,
            id=_str(getattr(response, "id", None)),
            replica=self.name,
        )

    def _error(self, litellm: ModuleType, exc: Exception) -> BackendError:
        status = getattr(exc, "status_code", None)
        transient = (
            getattr(litellm, "APIConnectionError", ()),
            getattr(litellm, "Timeout", ()),
            getattr(litellm, "RateLimitError", ()),
            getattr(litellm, "ServiceUnavailableError", ()),
            getattr(litellm, "InternalServerError", ()),
        )
        retryable = isinstance(exc, transient) or (
            isinstance(status, int) and status in _RETRY_STATUS
        )
        return BackendError(
            f"{self.name}: {type(exc).__name__}: {exc}", retryable=retryable, replica=self.name
        )


def _usage(raw: Any) -> Usage:
    """litellm's `Usage`; providers' cache reads (OpenAI `cached_tokens`, Anthropic
    `cache_read_input_tokens`) both land in `prompt_tokens_details.cached_tokens`."""
    if raw is None:
        return Usage()
    if isinstance(raw, Mapping):
        get = raw.get
    else:

        def get(key: str, default: Any = None) -> Any:
            return getattr(raw, key, default)

    details = get("prompt_tokens_details")
    cached = (
        details.get("cached_tokens")
        if isinstance(details, Mapping)
        else getattr(details, "cached_tokens", None)
    )
    if not cached:
        cached = get("cache_read_input_tokens")
    return Usage(
        prompt_tokens=int(get("prompt_tokens") or 0),
        completion_tokens=int(get("completion_tokens") or 0),
        cached_prompt_tokens=int(cached or 0),
    )
