"""Hardware + model profiles: the numbers behind the simulator's memory and step-time model.

A profile is a JSON file (`backends/sim/profiles/*.json`) that says what GPU(s) run which
model under which vLLM limits, and how efficiently. Every number carries a note in the
file's `sources` mapping (dotted field name -> where the number comes from); loading a
profile whose numbers lack a source is an error, so a profile always says where its numbers
came from.

Public API (stable):

    Profile.load(name_or_path) -> Profile      # "h100_sxm_llama31_8b" or a path to a .json
    Profile.default() -> Profile               # the H100 SXM + Llama-3.1-8B profile
    available_profiles() -> list[str]
    p.kv_storage_bytes_per_token               # 2 * layers * kv_heads * head_dim * dtype
    p.kv_bytes_per_token                       # the same at the weights' bandwidth (kv_mbu)
    p.weight_bytes                             # params * dtype bytes
    p.kv_capacity_tokens / p.kv_capacity_blocks
    p.step_time(tokens, attn_ctx, kv_read_tokens) -> seconds   # the roofline, one step
    p.kv_read_tokens(c, computed) -> float     # KV a chunk of c new tokens reads
    p.chunk_time(c, computed) -> seconds       # one step: a lone chunk of c new tokens
    p.prefill_time(n, cached=0) -> seconds     # a lone request's TTFT, chunked as the engine
    p.prefill_tokens_per_s(n) -> float
    p.decode_step_time(batch, context) -> seconds
    p.calibration                              # how it was measured, when calibrated

The step-time model (docs/benchmarks.md), a roofline per kernel, the kernels one after the
other: `t = overhead + max(gemm_flops / flops, weight_bytes / bandwidth) +
max(attention_flops / flops, kv_bytes / bandwidth)`, where `flops` and `bandwidth` are
the peaks times `mfu` and `mbu`:

- the GEMMs (projections, MLP): `2 * params * tokens` FLOPs against the weights, read once
  per step — decode steps are bound by the weights, large prefill chunks by compute;
- attention: `4 * layers * (heads * head_dim) * attn_ctx` FLOPs (attn_ctx: the sum over
  the step's new tokens of the context each attends to, itself included; weighted by
  `mfu / attention_mfu` when a profile gives attention its own efficiency) against the KV
  it moves: `kv_bytes_per_token * (kv_read_tokens + tokens)` — the KV the new tokens write,
  and the attended context read once *per query tile*: an attention kernel streams the
  context past a tile of `attention_query_tile` query tokens at a time (FlashAttention's
  row block on a GPU; on a CPU, llama.cpp's kernels reuse little), so a chunk of `c` new
  tokens on `a` computed ones reads `kv_read_tokens(c, a)` = `k * a + tile * k * (k - 1) / 2`
  tokens of KV, `k = ceil(c / tile)` (None: a chunk reads its context once). A decode
  token reads its whole context; a short suffix on a long cached prefix reads the prefix
  once per tile, and is bound by those reads where they outlast its FLOPs.
"""

from __future__ import annotations

import json
import math
from functools import cached_property
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

PROFILES_DIR = Path(__file__).parent / "profiles"
DEFAULT_PROFILE = "h100_sxm_llama31_8b"


class GPUSpec(BaseModel):
    """One GPU's peak numbers and how many of them serve one replica (tensor parallel)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    count: int = Field(1, ge=1)
    peak_flops: float = Field(gt=0, description="dense bf16 FLOP/s per GPU")
    hbm_bandwidth: float = Field(gt=0, description="HBM bytes/s per GPU")
    memory_bytes: float = Field(gt=0, description="HBM bytes per GPU")


class ModelSpec(BaseModel):
    """The model's size and attention shape."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    params: float = Field(gt=0)
    layers: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    num_heads: int = Field(ge=1)
    kv_heads: int = Field(ge=1)
    head_dim: int = Field(ge=1)
    dtype_bytes: int = Field(ge=1)
    max_model_len: int = Field(ge=1)


class Efficiency(BaseModel):
    """What fraction of the peaks real kernels reach, and the fixed cost of one step."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mfu: float = Field(gt=0, le=1, description="achieved / peak FLOP/s")
    mbu: float = Field(gt=0, le=1, description="achieved / peak HBM bandwidth")
    step_overhead_s: float = Field(ge=0, description="scheduler + launch cost per step")
    #: achieved / peak FLOP/s of attention (QK^T, AV) when it differs from the GEMMs' `mfu`
    #: (a CPU's is often several times lower); None: the same
    attention_mfu: float | None = Field(default=None, gt=0, le=1)
    #: achieved / peak bandwidth of reading the KV cache (decode attention over a long
    #: context) when it differs from streaming the weights (`mbu`); None: the same
    kv_mbu: float | None = Field(default=None, gt=0, le=1)
    #: query tokens that share one read of the attended KV context (the attention kernel's
    #: query tile); None: a whole prefill chunk reads its context once
    attention_query_tile: int | None = Field(default=None, ge=1)


class EngineLimits(BaseModel):
    """vLLM's engine arguments that shape batching and memory."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    gpu_memory_utilization: float = Field(gt=0, le=1)
    block_size: int = Field(16, ge=1)
    max_num_seqs: int = Field(256, ge=1)
    max_num_batched_tokens: int = Field(8192, ge=1)


class Calibration(BaseModel):
    """How a calibrated profile was measured (`treadle sim calibrate`): the server, when,
    the fitted request overhead the engine does not model (HTTP, tokenising, the chat
    template: added to every simulated time to first token), and the fit's error."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    server: str
    served_model: str
    measured_at: str
    samples: int = Field(ge=1)
    request_overhead_s: float = Field(ge=0)
    fit_mape: float = Field(ge=0, description="mean |error| / measured over the samples")
    validation_ttft_mape: float | None = None
    validation_decode_mape: float | None = None


class Profile(BaseModel):
    """A GPU + model + engine profile; see the module docstring."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    description: str = ""
    gpu: GPUSpec
    model: ModelSpec
    efficiency: Efficiency
    engine: EngineLimits
    #: dotted field name (e.g. "gpu.peak_flops") -> where the number comes from
    sources: dict[str, str]
    #: set when the efficiencies were measured on a real server
    calibration: Calibration | None = None

    @model_validator(mode="after")
    def _every_number_has_a_source(self) -> Profile:
        missing = [
            f"{section}.{field}"
            for section in ("gpu", "model", "efficiency", "engine")
            for field, value in getattr(self, section)
            if isinstance(value, int | float) and f"{section}.{field}" not in self.sources
        ]
        if missing:
            raise ValueError(f"profile {self.name!r}: no source note for {', '.join(missing)}")
        if self.engine.max_num_seqs > self.engine.max_num_batched_tokens:
            raise ValueError("engine.max_num_seqs must not exceed engine.max_num_batched_tokens")
        if self.kv_capacity_blocks < 1:
            raise ValueError(f"profile {self.name!r}: the weights leave no memory for KV cache")
        return self

    # -- loading ---------------------------------------------------------------------------

    @classmethod
    def load(cls, name_or_path: str | Path) -> Profile:
        """Load a bundled profile by name, or any profile file by path."""
        path = Path(name_or_path)
        if not path.suffix and not path.exists():
            path = PROFILES_DIR / f"{name_or_path}.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"no simulator profile {str(name_or_path)!r}; bundled: "
                f"{', '.join(available_profiles())}"
            )
        return cls.model_validate(json.loads(path.read_text()))

    @classmethod
    def default(cls) -> Profile:
        return cls.load(DEFAULT_PROFILE)

    # -- memory ----------------------------------------------------------------------------

    @cached_property
    def kv_storage_bytes_per_token(self) -> int:
        """K and V, every layer, every KV head (summed over tensor-parallel shards)."""
        m = self.model
        return 2 * m.layers * m.kv_heads * m.head_dim * m.dtype_bytes

    @cached_property
    def kv_bytes_per_token(self) -> float:
        """KV bytes a step reads or writes per token, counted at the weights' bandwidth: the
        stored bytes, scaled by `mbu / kv_mbu` when reading the KV cache has its own
        efficiency, so that `bytes / effective_bandwidth` is its time everywhere."""
        e = self.efficiency
        scale = e.mbu / e.kv_mbu if e.kv_mbu is not None else 1.0
        return self.kv_storage_bytes_per_token * scale

    @cached_property
    def weight_bytes(self) -> float:
        return self.model.params * self.model.dtype_bytes

    @cached_property
    def kv_capacity_blocks(self) -> int:
        """(memory * utilization - weights) / KV bytes per token, in whole blocks."""
        usable = (
            self.gpu.memory_bytes * self.gpu.count * self.engine.gpu_memory_utilization
            - self.weight_bytes
        )
        block_bytes = self.kv_storage_bytes_per_token * self.engine.block_size
        return max(0, int(usable // block_bytes))

    @cached_property
    def kv_capacity_tokens(self) -> int:
        return self.kv_capacity_blocks * self.engine.block_size

    # -- time ------------------------------------------------------------------------------

    @cached_property
    def effective_flops(self) -> float:
        """FLOP/s one replica reaches: peak * GPUs * mfu."""
        return self.gpu.peak_flops * self.gpu.count * self.efficiency.mfu

    @cached_property
    def effective_bandwidth(self) -> float:
        """Bytes/s one replica reaches: bandwidth * GPUs * mbu."""
        return self.gpu.hbm_bandwidth * self.gpu.count * self.efficiency.mbu

    @cached_property
    def attn_flops_per_ctx_token(self) -> float:
        """FLOPs for one new token attending to one context token: QK^T and AV, all layers,
        counted at the GEMMs' rate: scaled by `mfu / attention_mfu` when attention runs at
        its own efficiency, so that `flops / effective_flops` is its time everywhere."""
        m = self.model
        flops = 4.0 * m.layers * m.num_heads * m.head_dim
        e = self.efficiency
        return flops * (e.mfu / e.attention_mfu) if e.attention_mfu is not None else flops

    @cached_property
    def step_coefficients(self) -> tuple[float, float, float, float]:
        """Seconds per GEMM token, per attended context token, for the weights, and per KV
        token moved: `step_time` in the form the engine sums in closed form."""
        flops = self.effective_flops
        bw = self.effective_bandwidth
        return (
            2.0 * self.model.params / flops,
            self.attn_flops_per_ctx_token / flops,
            self.weight_bytes / bw,
            self.kv_bytes_per_token / bw,
        )

    def step_time(self, tokens: float, attn_ctx: float, kv_read_tokens: float) -> float:
        """Seconds for one engine step that computes `tokens` new tokens (see module doc)."""
        tok, attn, weights, kv = self.step_coefficients
        return (
            self.efficiency.step_overhead_s
            + max(tok * tokens, weights)
            + max(attn * attn_ctx, kv * (kv_read_tokens + tokens))
        )

    def kv_read_tokens(self, c: int, computed: int) -> float:
        """Tokens of KV a chunk of `c` new tokens on `computed` ones reads: the context
        before each query tile, once per tile (module doc)."""
        tile = self.efficiency.attention_query_tile
        if tile is None or c <= tile:
            return float(computed)
        k = -(-c // tile)
        return k * computed + tile * k * (k - 1) / 2.0

    def chunk_time(self, c: int, computed: int) -> float:
        """One step that computes only a chunk of `c` new tokens on `computed` cached ones."""
        attn_ctx = c * computed + c * (c + 1) / 2.0
        return self.step_time(c, attn_ctx, self.kv_read_tokens(c, computed))

    def prefill_time(self, n: int, cached: int = 0) -> float:
        """Time to first token of a lone request with an `n`-token prompt, `cached` of them
        already in the prefix cache: the engine's chunks of `max_num_batched_tokens`."""
        if n < 1 or not 0 <= cached < n:
            raise ValueError("need n >= 1 and 0 <= cached < n")
        budget = self.engine.max_num_batched_tokens
        done, total = cached, 0.0
        while done < n:
            c = min(budget, n - done)
            total += self.chunk_time(c, done)
            done += c
        return total

    def prefill_tokens_per_s(self, n: int) -> float:
        return n / self.prefill_time(n)

    def decode_step_time(self, batch: int, context: int) -> float:
        """One decode step for `batch` requests that each hold `context` tokens of KV."""
        return self.step_time(batch, batch * (context + 1), batch * context)


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.json"))


def sum_max_linear(a: float, b: float, c: float, e: float, j: int) -> float:
    """sum_{i=0}^{j-1} max(a + b*i, c + e*i), in closed form."""
    if j <= 0:
        return 0.0

    def lin(p: float, q: float, lo: int, hi: int) -> float:
        n = hi - lo
        return n * p + q * (lo + hi - 1) * n / 2.0 if n > 0 else 0.0

    if b == e:
        return lin(max(a, c), b, 0, j)
    x = (c - a) / (b - e)  # where a + b*i == c + e*i
    if b > e:  # the first term wins from ceil(x) on
        k = min(j, max(0, math.ceil(x)))
        return lin(c, e, 0, k) + lin(a, b, k, j)
    k = min(j, max(0, math.floor(x) + 1))  # the first term wins up to floor(x)
    return lin(a, b, 0, k) + lin(c, e, k, j)
