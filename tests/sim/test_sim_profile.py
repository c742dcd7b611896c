"""Profiles: the memory arithmetic and the roofline the simulator is built on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from treadle.backends.sim.profile import PROFILES_DIR, Profile, available_profiles


def test_bundled_profiles_load_with_sources() -> None:
    assert {"h100_sxm_llama31_8b", "h100_sxm_llama31_70b_tp4"} <= set(available_profiles())
    for name in available_profiles():
        p = Profile.load(name)
        assert p.engine.block_size == 16
        assert all(note.strip() for note in p.sources.values())


def test_llama_8b_memory() -> None:
    p = Profile.default()
    assert p.kv_bytes_per_token == 128 * 1024  # 2 * 32 layers * 8 heads * 128 * 2 bytes
    usable = 80e9 * 0.9 - 8_030_261_248 * 2
    assert p.kv_capacity_blocks == int(usable // (128 * 1024 * 16))
    assert p.kv_capacity_tokens == p.kv_capacity_blocks * 16


def test_llama_70b_tp4_memory() -> None:
    p = Profile.load("h100_sxm_llama31_70b_tp4")
    assert p.kv_bytes_per_token == 320 * 1024
    usable = 4 * 80e9 * 0.9 - 70_553_706_496 * 2
    assert p.kv_capacity_tokens == int(usable // (320 * 1024 * 16)) * 16


def test_a_number_without_a_source_is_refused(tmp_path: Path) -> None:
    data = json.loads((PROFILES_DIR / "h100_sxm_llama31_8b.json").read_text())
    del data["sources"]["efficiency.mfu"]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"efficiency\.mfu"):
        Profile.load(path)


def test_unknown_profile_names_the_bundled_ones() -> None:
    with pytest.raises(FileNotFoundError, match="h100_sxm_llama31_8b"):
        Profile.load("no_such_gpu")


def test_roofline_regimes() -> None:
    p = Profile.default()
    # A lone decode step streams the weights once: memory bound.
    weights_s = p.weight_bytes / p.effective_bandwidth
    assert p.decode_step_time(1, 0) == pytest.approx(
        p.efficiency.step_overhead_s + weights_s, rel=0.01
    )
    # A large prefill chunk is compute bound: 2 * params FLOPs per token at least.
    per_token = 2 * p.model.params / p.effective_flops
    assert p.prefill_time(8192) > 8192 * per_token
    assert p.prefill_time(8192) < 8192 * per_token * 1.25
    # Longer prompts cost more per token (attention), and chunks add up.
    assert p.prefill_tokens_per_s(32768) < p.prefill_tokens_per_s(2048)
    assert p.prefill_time(20000, cached=10000) < p.prefill_time(20000)
    with pytest.raises(ValueError):
        p.prefill_time(10, cached=10)


def _with_tile(p: Profile, tile: int | None) -> Profile:
    return p.model_copy(
        update={"efficiency": p.efficiency.model_copy(update={"attention_query_tile": tile})}
    )


def test_a_chunk_reads_its_context_once_per_query_tile() -> None:
    p = _with_tile(Profile.default(), 4)
    # tiles of 4 new tokens start after 100, 104 and 108 computed tokens
    assert p.kv_read_tokens(10, 100) == 100 + 104 + 108
    assert p.kv_read_tokens(4, 100) == 100  # one tile: one read, as a decode token
    assert _with_tile(p, None).kv_read_tokens(10, 100) == 100  # a chunk: one read


@pytest.mark.parametrize("profile", ["h100_sxm_llama31_8b", "llamacpp_cpu_small"])
def test_a_short_suffix_on_a_long_cached_prefix_takes_at_least_the_kv_reads(
    profile: str,
) -> None:
    """Attention for a few query tokens is bound by reading the cached KV, once per query
    tile, not by its FLOPs: 40 new tokens on 4,100 cached ones take at least that long."""
    p = Profile.load(profile)
    cached, new = 4100, 40
    kv_s = p.kv_bytes_per_token / p.effective_bandwidth  # one token of KV, read
    tile = p.efficiency.attention_query_tile or new
    reads = -(-new // tile) * cached
    assert p.prefill_time(cached + new, cached) >= reads * kv_s
    # ... and a kernel that re-reads the context for every query token (tile 1) is slower
    # than one that reads it once for the whole chunk
    per_token = _with_tile(p, 1).prefill_time(cached + new, cached)
    once = _with_tile(p, None).prefill_time(cached + new, cached)
    assert per_token >= new * cached * kv_s
    assert per_token > once


def test_the_kernels_add_up_the_gemms_and_attention_each_bound_by_their_own_roof() -> None:
    """A step's GEMMs are bound by compute or by the weights, its attention by compute or
    by the KV; the two kernels run one after the other, so their times add."""
    p = Profile.default()
    tok, attn, weights, kv = p.step_coefficients
    oh = p.efficiency.step_overhead_s
    # a big batch of decodes at long contexts: compute-bound GEMMs + memory-bound attention
    b, ctx = 1024, 4000
    assert tok * b > weights and kv * b * (ctx + 1) > attn * b * (ctx + 1)
    assert p.decode_step_time(b, ctx) == pytest.approx(oh + tok * b + kv * b * (ctx + 1))
