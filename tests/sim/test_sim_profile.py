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
