"""Per-server dialects: how treadle's `SchedulingHints` travel to each OpenAI-compatible server.

Every server speaks `/v1/chat/completions`, but each has its own extra fields for what
treadle's scheduler knows. A dialect adds exactly the fields its server reads (names checked
against the servers' sources, cited below), declares what it can honour (`Capabilities`)
and which Prometheus metrics carry its load.

| hint         | vllm            | sglang          | continuum      | dynamo (6)    | llamacpp (7) |
|--------------|-----------------|-----------------|----------------|---------------|--------------|
| request_id   | X-Request-Id    | rid             | X-Request-Id   | x-request-id  | --           |
| priority     | priority (1)    | -priority (2)   | -- (3)         | nvext, negated| --           |
| program_id   | vllm_xargs (4)  | --              | job_id         | session header| slot choice  |
| is_last_step | vllm_xargs (4)  | --              | is_last_step   | session final | no pin       |
| next_tool    | vllm_xargs (4)  | --              | this_func_call | spec. prefill | --           |
| pin_ttl_s    | vllm_xargs (4)  | --              | -- (own TTL)   | cache_control | slot pin     |
| tenant       | cache_salt (5)  | cache_salt (5)  | cache_salt (5) | --            | --           |

The `sim` dialect sends every hint top level, with treadle's conventions, and `cache_salt`
as (5).
The `openai` dialect sends no hints. (1) as is (lower runs first), and only with
`priority_scheduling=True`, i.e. a server started with `--scheduling-policy priority`.
(2) only with `priority_scheduling=True` (`--enable-priority-scheduling`); negated because
SGLang runs higher values first, sent as is with `low_priority_values_first=True`
(`--schedule-low-priority-values-first`). (3) the fork's `continuum` policy is program-level
FCFS, and vLLM rejects a non-zero priority under any policy but `priority`.
(4) `vllm_xargs.treadle_program_id` / `treadle_is_last_step` / `treadle_next_tool` /
`treadle_pin_ttl_s` reach `SamplingParams.extra_args`, where stock vLLM ignores them and a
scheduler or KV-connector plugin can read them.
(5) only when a `cache_salt_secret` is configured: the salt is HMAC-SHA256(secret, tenant),
so tenants do not share (or probe) each other's prefix cache, and the salt cannot be guessed
from the tenant name.
(6) `DynamoDialect`: headers and `nvext` fields, each behind an option (its docstring).
(7) `LlamaCppDialect` sends `cache_prompt`; the slot-level hints are `LlamaCppBackend`'s
(`id_slot`, slot reservation, save/restore under `/slots`).
SGLang sessions (`session_params` / `session_id`) are not used: they need `/open_session`
and make the server append each request to the session's previous context, while treadle
always sends the whole conversation; affinity is treadle's router's job. What each engine
offers agents, with the upstream files and commits, is in docs/engines.md.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import inspect
import math
import re
from typing import Any, ClassVar

from pydantic import validate_call

from treadle.backends.base import Capabilities, SchedulingHints
from treadle.backends.openai_compat.hint_wire import BODY_FIELD, WireHints
from treadle.backends.openai_compat.server_metrics import MetricNames

# vllm/v1/metrics/loggers.py (PrometheusStatLogger). `vllm:gpu_cache_usage_perc` and
# `vllm:gpu_prefix_cache_*` are the names before vLLM 0.9, still exported there as deprecated.
VLLM_METRICS = MetricNames(
    running=("vllm:num_requests_running",),
    waiting=("vllm:num_requests_waiting",),
    kv_usage=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    prefix_hits=("vllm:prefix_cache_hits", "vllm:gpu_prefix_cache_hits"),
    prefix_queries=("vllm:prefix_cache_queries", "vllm:gpu_prefix_cache_queries"),
)

# python/sglang/srt/metrics/collector.py (SchedulerMetricsCollector); exported only with
# `--enable-metrics`. SGLang keeps no hit/query counters, only a `cache_hit_rate` gauge.
SGLANG_METRICS = MetricNames(
    running=("sglang:num_running_reqs",),
    waiting=("sglang:num_queue_reqs",),
    kv_usage=("sglang:token_usage",),
    prefix_hit_rate=("sglang:cache_hit_rate",),
)

_SCHEMA_NAME = re.compile(r"[^a-zA-Z0-9_-]")


class Dialect:
    """Base: an OpenAI-compatible server that reads none of treadle's hints."""

    name: ClassVar[str] = "openai"
    #: Prometheus names of the load metrics, or None when the server exports none
    metric_names: ClassVar[MetricNames | None] = None
    #: path (under the server root) answering 200 when the server is up
    health_path: ClassVar[str] = "/health"
    #: whether the server honours `stream_options: {"include_usage": true}`
    stream_usage: ClassVar[bool] = True
    #: field that bounds the completion length
    max_tokens_field: ClassVar[str] = "max_tokens"

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(streaming=True, tool_calls=True, metrics=self.metric_names is not None)

    def hint_fields(self, hints: SchedulingHints) -> tuple[dict[str, Any], dict[str, str]]:
        """Body fields and HTTP headers that carry `hints` to this server."""
        return {}, {}

    def tool_fields(self) -> dict[str, Any]:
        """Extra body fields for a request that offers tools."""
        return {}

    def structured_output(self, schema: dict[str, Any]) -> dict[str, Any]:
        """Body fields that constrain the answer to the JSON `schema`.

        OpenAI's `response_format: json_schema` is accepted by vLLM (turned into structured
        outputs), SGLang (protocol.py `ResponseFormat`) and OpenAI alike.
        """
        name = _SCHEMA_NAME.sub("_", str(schema.get("title") or "output"))[:64] or "output"
        return {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": name, "schema": schema, "strict": True},
            }
        }


class OpenAIDialect(Dialect):
    """OpenAI itself (or any plain OpenAI-compatible endpoint): no scheduling hints."""

    name = "openai"
    health_path = "/v1/models"
    max_tokens_field = "max_completion_tokens"

    def structured_output(self, schema: dict[str, Any]) -> dict[str, Any]:
        # OpenAI's strict mode refuses schemas that are not closed (`additionalProperties:
        # false` everywhere, every property required) - pydantic's schemas often are not.
        fields = super().structured_output(schema)
        fields["response_format"]["json_schema"]["strict"] = False
        return fields


class _SaltMixin:
    """`cache_salt` derived from the tenant, for servers that salt their prefix cache."""

    cache_salt_secret: str | None = None

    def _salt(self, hints: SchedulingHints) -> dict[str, Any]:
        if self.cache_salt_secret is None or hints.tenant is None:
            return {}
        digest = hmac.new(
            self.cache_salt_secret.encode(), hints.tenant.encode(), hashlib.sha256
        ).digest()
        # 43 characters of base64: the 256 bits vLLM's protocol.py recommends for a salt.
        return {"cache_salt": base64.urlsafe_b64encode(digest).decode().rstrip("=")}


class VLLMDialect(_SaltMixin, Dialect):
    """vLLM's OpenAI server (vllm/entrypoints/openai/chat_completion/protocol.py).

    `priority_scheduling` must match the server: vLLM answers 400 "Got priority N but
    Priority scheduling is not enabled" (vllm/v1/engine/processor.py) to any non-zero
    `priority` unless started with `--scheduling-policy priority`.
    """

    name = "vllm"
    metric_names = VLLM_METRICS
    health_path = "/health"

    @validate_call
    def __init__(
        self,
        *,
        priority_scheduling: bool = False,
        cache_salt_secret: str | None = None,
        xargs: bool = True,
    ) -> None:
        self.priority_scheduling = priority_scheduling
        self.cache_salt_secret = cache_salt_secret
        self.xargs = xargs

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            streaming=True,
            tool_calls=True,
            prefix_cache=True,
            priority=self.priority_scheduling,
            metrics=True,
        )

    def hint_fields(self, hints: SchedulingHints) -> tuple[dict[str, Any], dict[str, str]]:
        body: dict[str, Any] = {}
        headers: dict[str, str] = {}
        if hints.request_id is not None:
            # OpenAIServing._base_request_id: the `X-Request-Id` header wins over the body's
            # `request_id`, and older servers know only the header.
            headers["X-Request-Id"] = hints.request_id
        if self.priority_scheduling:
            # ChatCompletionRequest.priority: "lower means earlier handling" - treadle's sign.
            body["priority"] = hints.priority
        if self.xargs:
            # ChatCompletionRequest.vllm_xargs: dict[str, str | int | float]; no bools.
            xargs: dict[str, str | int | float] = {}
            if hints.program_id is not None:
                xargs["treadle_program_id"] = hints.program_id
            if hints.pin_ttl_s is not None:
                xargs["treadle_pin_ttl_s"] = float(hints.pin_ttl_s)
            if hints.next_tool is not None:
                xargs["treadle_next_tool"] = hints.next_tool
            if hints.program_id is not None or hints.is_last_step:
                xargs["treadle_is_last_step"] = int(hints.is_last_step)
            if xargs:
                body["vllm_xargs"] = xargs
        body.update(self._salt(hints))
        return body, headers


class SGLangDialect(_SaltMixin, Dialect):
    """SGLang's OpenAI server (python/sglang/srt/entrypoints/openai/protocol.py).

    SGLang honours `priority` only with `--enable-priority-scheduling`, and then runs HIGHER
    values first unless `--schedule-low-priority-values-first` is set
    (python/sglang/srt/server_args.py); treadle's lower-first value is negated to match.
    Prompt cached tokens appear in `usage` only with `--enable-cache-report`.
    """

    name = "sglang"
    metric_names = SGLANG_METRICS
    health_path = "/health"

    @validate_call
    def __init__(
        self,
        *,
        priority_scheduling: bool = False,
        low_priority_values_first: bool = False,
        cache_salt_secret: str | None = None,
    ) -> None:
        self.priority_scheduling = priority_scheduling
        self.low_priority_values_first = low_priority_values_first
        self.cache_salt_secret = cache_salt_secret

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            streaming=True,
            tool_calls=True,
            prefix_cache=True,
            priority=self.priority_scheduling,
            metrics=True,
        )

    def hint_fields(self, hints: SchedulingHints) -> tuple[dict[str, Any], dict[str, str]]:
        body: dict[str, Any] = {}
        if hints.request_id is not None:
            # ChatCompletionRequest.rid -> GenerateReqInput.rid (serving_chat.py).
            body["rid"] = hints.request_id
        if self.priority_scheduling:
            body["priority"] = hints.priority if self.low_priority_values_first else -hints.priority
        body.update(self._salt(hints))
        return body, {}


class ContinuumDialect(_SaltMixin, Dialect):
    """The Continuum fork of vLLM (Hanchenli/vllm-continuum; fields as in the public copy
    Whrlicht/vllm-continuum, vllm/entrypoints/openai/protocol.py, ChatCompletionRequest).

    `job_id: str` groups a program's calls; `is_last_step: bool` marks the program's last LLM
    call (no pin after it); `this_func_call: str` names the tool this call's answer invokes,
    from which the engine's `set_up_pin` (vllm/v1/core/estimate_with_func.py) decides a TTL
    pin (fixed 2 s when that tool's running-mean duration is at most 2 s). All three are copied
    into `SamplingParams.extra_args`. `last_func_call` is filled in by the server itself.
    The server runs with `--scheduling-policy continuum`, under which vLLM rejects non-zero
    `priority`, so no priority is sent.
    """

    name = "continuum"
    metric_names = VLLM_METRICS
    health_path = "/health"

    @validate_call
    def __init__(self, *, cache_salt_secret: str | None = None) -> None:
        self.cache_salt_secret = cache_salt_secret

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            streaming=True, tool_calls=True, prefix_cache=True, program_id=True, metrics=True
        )

    def hint_fields(self, hints: SchedulingHints) -> tuple[dict[str, Any], dict[str, str]]:
        body: dict[str, Any] = {}
        headers: dict[str, str] = {}
        if hints.request_id is not None:
            headers["X-Request-Id"] = hints.request_id
        if hints.program_id is not None:
            body["job_id"] = hints.program_id
            body["is_last_step"] = hints.is_last_step
            if hints.next_tool is not None and not hints.is_last_step:
                body["this_func_call"] = hints.next_tool
        body.update(self._salt(hints))
        return body, headers


# tools/server/server-task.cpp (server_task_result_metrics::to_metrics), with `--metrics`.
# `prompt_tokens_total` counts the prompt tokens computed (cached ones excluded), so the
# queries are hits + misses. llama.cpp exports no KV usage gauge: `LlamaCppBackend` fills
# `kv_usage` in from its slot table.
LLAMACPP_METRICS = MetricNames(
    running=("llamacpp:requests_processing",),
    waiting=("llamacpp:requests_deferred",),
    prefix_hits=("llamacpp:prompt_tokens_cached",),
    prefix_misses=("llamacpp:prompt_tokens",),
)


class LlamaCppDialect(Dialect):
    """llama.cpp's `llama-server` (tools/server; fields read in server-schema.cpp and
    server-context.cpp, llama-cpp-python 0.3.36's vendored copy, commit 0c1e570).

    Every request asks for `cache_prompt: true` (reuse the slot's KV for the common prefix).
    llama.cpp has no program ids, priorities or pins: a server has `-np` *slots*, each with
    its own KV partition that keeps its last sequence until another request takes the slot.
    `LlamaCppBackend` (llamacpp.py) builds program affinity, pins and KV offload on that:
    it picks each request's slot itself (`id_slot`), reserves a program's slot while its
    tool runs (`pinning`), and saves a slot that another request must take to a file under
    the server's `--slot-save-path`, restoring it when the program comes back (`offload`).
    This dialect alone (on a plain `OpenAICompatBackend`) sends `cache_prompt` and lets the
    server choose slots (by longest common prefix, then least recently used).

    Quirks handled: a truncated tool call (`finish_reason: "length"`) is refused by the
    backend rather than sent back (llama.cpp answers HTTP 500 to its own truncated call);
    treadle sends no `tool_choice` or `parallel_tool_calls` (llama.cpp treats a named
    choice as "auto" and ignores the flag). `tool_call_bias` adds `logit_bias` on the
    `<tool_call>` token to requests that offer tools (for small models that rarely call
    tools, and the tests' random one); `extra_body` is merged into every request (sampling
    knobs, a `grammar`).
    """

    name = "llamacpp"
    metric_names = LLAMACPP_METRICS
    health_path = "/health"

    @validate_call
    def __init__(
        self,
        *,
        manage_slots: bool = True,
        pinning: bool = True,
        offload: bool = True,
        offload_min_tokens: int = 64,
        max_pinned_slots: int | None = None,
        tool_call_bias: float | None = None,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        if offload_min_tokens < 0:
            raise ValueError("offload_min_tokens must be >= 0")
        if max_pinned_slots is not None and max_pinned_slots < 0:
            raise ValueError("max_pinned_slots must be >= 0")
        self.manage_slots = manage_slots
        self.pinning = pinning and manage_slots
        self.offload = offload and manage_slots
        self.offload_min_tokens = offload_min_tokens
        self.max_pinned_slots = max_pinned_slots
        self.tool_call_bias = tool_call_bias
        self.extra_body = dict(extra_body or {})

    @property
    def capabilities(self) -> Capabilities:
        # Pins need the slot table, i.e. `LlamaCppBackend`, which widens this.
        return Capabilities(streaming=True, tool_calls=True, prefix_cache=True, metrics=True)

    def hint_fields(self, hints: SchedulingHints) -> tuple[dict[str, Any], dict[str, str]]:
        return {**self.extra_body, "cache_prompt": True}, {}

    def tool_fields(self) -> dict[str, Any]:
        if self.tool_call_bias is None:
            return {}
        return {"logit_bias": {"<tool_call>": self.tool_call_bias}}


class DynamoDialect(Dialect):
    """NVIDIA Dynamo's OpenAI frontend (ai-dynamo/dynamo; cited in docs/engines.md).

    Sent: `x-request-id` (Dynamo copies it into `request.x_request_id`), the program as the
    session (`X-Dynamo-Session-ID`; `X-Dynamo-Session-Final: true` on its last step), which
    Dynamo records as passive `agent_context` identity (it changes no placement by itself),
    and under `nvext`: `agent_hints.priority` with `priority_hints=True` (negated: Dynamo's
    unified priority runs higher values first), `agent_hints.speculative_prefill` with
    `speculative_prefill=True` on a call the program continues after a tool (Dynamo then
    prefills the predicted next-turn prefix on a worker), and `cache_control` (`{"type":
    "ephemeral", "ttl": "<N>s"}`) from `pin_ttl_s` with `cache_control=True`. That last one is
    experimental upstream: it needs `--enable-cache-control` on the frontend and SGLang's
    HiCache prefix pins, which SGLang has since reverted; Dynamo clamps the TTL to 300-3600 s.
    Dynamo's router does prefix-aware placement itself; load comes from its own metrics.
    """

    name = "dynamo"
    health_path = "/health"

    @validate_call
    def __init__(
        self,
        *,
        priority_hints: bool = False,
        speculative_prefill: bool = False,
        cache_control: bool = False,
    ) -> None:
        self.priority_hints = priority_hints
        self.speculative_prefill = speculative_prefill
        self.cache_control = cache_control

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            streaming=True,
            tool_calls=True,
            prefix_cache=True,
            priority=self.priority_hints,
            pin_ttl=self.cache_control,
            program_id=True,
        )

    def hint_fields(self, hints: SchedulingHints) -> tuple[dict[str, Any], dict[str, str]]:
        headers: dict[str, str] = {}
        if hints.request_id is not None:
            headers["x-request-id"] = hints.request_id
        if hints.program_id is not None:
            headers["X-Dynamo-Session-ID"] = hints.program_id
            if hints.is_last_step:
                headers["X-Dynamo-Session-Final"] = "true"
        agent_hints: dict[str, Any] = {}
        if self.priority_hints:
            agent_hints["priority"] = -hints.priority
        continues = hints.program_id is not None and not hints.is_last_step
        if self.speculative_prefill and continues and hints.next_tool is not None:
            agent_hints["speculative_prefill"] = True
        nvext: dict[str, Any] = {}
        if agent_hints:
            nvext["agent_hints"] = agent_hints
        if self.cache_control and hints.pin_ttl_s is not None and continues:
            ttl = max(1, math.ceil(hints.pin_ttl_s))
            nvext["cache_control"] = {"type": "ephemeral", "ttl": f"{ttl}s"}
        return ({"nvext": nvext} if nvext else {}), headers


#: what treadle's simulator can do, over HTTP (`SimDialect`) or in-process (`SimBackend`)
SIM_CAPABILITIES = Capabilities(
    streaming=True,
    tool_calls=True,
    prefix_cache=True,
    priority=True,
    pin_ttl=True,
    program_id=True,
    metrics=True,
)


class SimDialect(_SaltMixin, Dialect):
    """treadle's own simulator server (`treadle sim serve`): every hint, top level, with
    treadle's conventions (`priority` lower first, `pin_ttl_s` in seconds), and vLLM's
    `cache_salt`."""

    name = "sim"
    metric_names = VLLM_METRICS
    health_path = "/health"

    @validate_call
    def __init__(self, *, cache_salt_secret: str | None = None) -> None:
        self.cache_salt_secret = cache_salt_secret

    @property
    def capabilities(self) -> Capabilities:
        return SIM_CAPABILITIES

    def hint_fields(self, hints: SchedulingHints) -> tuple[dict[str, Any], dict[str, str]]:
        body: dict[str, Any] = {"priority": hints.priority, "is_last_step": hints.is_last_step}
        if hints.program_id is not None:
            body["program_id"] = hints.program_id
        if hints.pin_ttl_s is not None:
            body["pin_ttl_s"] = hints.pin_ttl_s
        body.update(self._salt(hints))
        headers = {"X-Request-Id": hints.request_id} if hints.request_id is not None else {}
        return body, headers


class GatewayDialect(Dialect):
    """`treadle gateway` (`treadle.runtime.gateway`): every hint in one `treadle` body
    field (`hint_wire.WireHints`); the gateway schedules the call and adds the fields of
    the replica it picks. Its `/metrics` are the gateway's own, not an engine's."""

    name = "gateway"
    health_path = "/health"

    @validate_call
    def __init__(self) -> None:
        pass

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(streaming=True, tool_calls=True, prefix_cache=True, program_id=True)

    def hint_fields(self, hints: SchedulingHints) -> tuple[dict[str, Any], dict[str, str]]:
        return {BODY_FIELD: WireHints.from_hints(hints).to_wire()}, {}


DIALECTS: dict[str, type[Dialect]] = {
    d.name: d
    for d in (
        VLLMDialect,
        SGLangDialect,
        ContinuumDialect,
        LlamaCppDialect,
        DynamoDialect,
        SimDialect,
        OpenAIDialect,
        GatewayDialect,
    )
}


def make_dialect(name: str, **options: Any) -> Dialect:
    """The dialect called `name`, configured with `options`. `ValueError` names an unknown
    dialect or option; a `pydantic.ValidationError` (also a `ValueError`) a mistyped one."""
    cls = DIALECTS.get(name)
    if cls is None:
        raise ValueError(f"unknown dialect {name!r}; expected one of {', '.join(DIALECTS)}")
    params = inspect.signature(cls.__init__).parameters
    accepted = [
        p for p in params if p != "self" and params[p].kind is inspect.Parameter.KEYWORD_ONLY
    ]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"dialect {name!r} has no option {', '.join(map(repr, unknown))}; "
            f"options: {', '.join(accepted) or '(none)'}"
        )
    return cls(**options)
