"""SageLLMConfig: dict and YAML round trips, replace(), defaults, and what the engine makes of them."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from sagellm.config import (
    DTYPES,
    BackendConfig,
    ConfigError,
    KVCacheConfig,
    ModelConfig,
    SageLLMConfig,
    SchedulerConfig,
)

CUSTOM = {
    "model": {"model_id": "/models/x.gguf", "dtype": "bfloat16", "max_model_len": 512},
    "kv_cache": {"block_size": 32, "num_blocks": 100, "memory_gb": 0.5, "enable_prefix_caching": True,
                 "tenant_isolation": True, "granularity": "request", "ddr_num_blocks": 40, "ddr_memory_gb": 0.0,
                 "nvme_num_blocks": None, "nvme_memory_gb": 0.25, "nvme_path": "/tmp/kv", "eviction_policy": "lfu",
                 "cold_timeout_s": None, "hot_access_threshold": 3, "max_promotions_per_step": 2,
                 "eviction_policy_args": {}},
    "scheduler": {"max_num_seqs": 8, "max_num_batched_tokens": 64, "chunked_prefill": False,
                  "max_prefill_batch": 4, "max_decode_batch": None, "mode": "time_share",
                  "inference_mode": "standard", "time_share_decode_steps": 3, "prefill_workers": 2,
                  "decode_workers": 3, "retry_on_worker_failure": True, "policy": "sjf",
                  "policy_args": {"max_wait_s": 12.5}},
    "backend": {"device": "cpu", "num_threads": 2, "seed": 7, "kernels": False},
    "benchmark": {"warmup_runs": 0, "repeats": 5, "min_output_tokens_per_s": 10.0,
                  "max_mean_ttft_ms": 500.0, "max_mean_tpot_ms": None},
}


def test_defaults_serve_the_default_model() -> None:
    cfg = SageLLMConfig()
    assert cfg.model.model_id is None
    assert cfg.model.dtype == "float32"
    assert cfg.backend.device == "auto"
    assert SageLLMConfig.from_dict({}) == cfg
    assert SageLLMConfig.from_dict(None) == cfg


def test_default_model_id_resolves_to_the_bundled_gguf() -> None:
    from sagellm.models.paths import default_model_path, resolve_model_path

    path = resolve_model_path(SageLLMConfig().model.model_id)
    assert path == default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    for alias in ("", "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"):
        assert resolve_model_path(alias) == path


def test_engine_with_defaults_serves_the_default_model(engine: Any) -> None:
    """The shared engine only overrides KV size and dtype; its model is the default one."""
    from sagellm.models.paths import default_model_path

    assert engine.config.model.model_id is None
    stats = engine.get_stats()
    assert stats["model_path"] == str(default_model_path())
    assert "smollm2" in stats["model"].lower() and "135m" in stats["model"].lower()


@pytest.mark.parametrize("cfg", [SageLLMConfig(), SageLLMConfig.from_dict(CUSTOM)], ids=["default", "custom"])
def test_dict_round_trip(cfg: SageLLMConfig) -> None:
    d = cfg.to_dict()
    assert isinstance(d, dict) and set(d) == {"model", "kv_cache", "scheduler", "backend", "benchmark"}
    assert SageLLMConfig.from_dict(d) == cfg
    assert SageLLMConfig.from_dict(d).to_dict() == d


def test_custom_values_are_kept() -> None:
    cfg = SageLLMConfig.from_dict(CUSTOM)
    assert cfg.to_dict() == CUSTOM
    assert cfg.kv_cache == KVCacheConfig(
        block_size=32, num_blocks=100, memory_gb=0.5, enable_prefix_caching=True, tenant_isolation=True,
        granularity="request", ddr_num_blocks=40, nvme_memory_gb=0.25, nvme_path="/tmp/kv", eviction_policy="lfu",
        cold_timeout_s=None, hot_access_threshold=3, max_promotions_per_step=2, eviction_policy_args={})
    policy = cfg.kv_cache.policy(block_bytes=2**20)
    assert (policy.ddr_blocks, policy.nvme_blocks, policy.swaps) == (40, 256, True)
    assert cfg.scheduler == SchedulerConfig(8, 64, False, 4, None, "time_share", "standard", 3, 2, 3, True,
                                            "sjf", {"max_wait_s": 12.5})


def test_partial_dict_fills_in_defaults() -> None:
    cfg = SageLLMConfig.from_dict({"model": {"dtype": "bfloat16"}, "scheduler": {"max_num_seqs": 4}})
    assert cfg.model == ModelConfig(dtype="bfloat16")
    assert cfg.scheduler == SchedulerConfig(max_num_seqs=4)
    assert cfg.kv_cache == KVCacheConfig() and cfg.backend == BackendConfig()


def test_ints_are_accepted_for_floats_and_null_for_optionals() -> None:
    cfg = SageLLMConfig.from_dict({"kv_cache": {"memory_gb": 2, "num_blocks": None},
                                   "model": {"max_model_len": None}})
    assert cfg.kv_cache.memory_gb == 2.0 and isinstance(cfg.kv_cache.memory_gb, float)
    assert cfg.kv_cache.num_blocks is None and cfg.model.max_model_len is None


def test_yaml_round_trip(tmp_path: Path) -> None:
    cfg = SageLLMConfig.from_dict(CUSTOM)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert SageLLMConfig.from_yaml(path) == cfg
    assert SageLLMConfig.from_yaml(str(path)) == cfg


def test_from_yaml_hand_written(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(
        "# a study config\n"
        "model:\n"
        "  dtype: bfloat16\n"
        "  max_model_len: 1024\n"
        "kv_cache:\n"
        "  num_blocks: 256\n"
        "scheduler:\n"
        "  max_num_batched_tokens: 128\n"
        "  chunked_prefill: true\n"
    )
    cfg = SageLLMConfig.from_yaml(path)
    assert cfg == SageLLMConfig().replace(
        model={"dtype": "bfloat16", "max_model_len": 1024},
        kv_cache={"num_blocks": 256},
        scheduler={"max_num_batched_tokens": 128},
    )
    assert cfg.model.model_id is None


def test_empty_yaml_file_is_the_default(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    assert SageLLMConfig.from_yaml(path) == SageLLMConfig()


def test_replace_changes_only_what_is_given() -> None:
    base = SageLLMConfig.from_dict(CUSTOM)
    new = base.replace(model={"dtype": "float32"}, backend={"seed": 1})
    assert new.model.dtype == "float32" and new.backend.seed == 1
    assert new.model.max_model_len == 512 and new.model.model_id == "/models/x.gguf"
    assert new.backend.device == "cpu" and new.kv_cache == base.kv_cache
    assert base.model.dtype == "bfloat16" and base.backend.seed == 7  # the original is unchanged
    assert base.replace() == base
    assert base.replace(model={}) == base


def test_replace_validates() -> None:
    cfg = SageLLMConfig()
    with pytest.raises(ConfigError, match="modle"):
        cfg.replace(modle={"dtype": "float32"})
    with pytest.raises(ConfigError, match=r"model\.dtyp"):
        cfg.replace(model={"dtyp": "float32"})
    with pytest.raises(ConfigError, match=r"model\.dtype"):
        cfg.replace(model={"dtype": "int8"})
    with pytest.raises(ConfigError, match=r"scheduler\.max_num_seqs"):
        cfg.replace(scheduler={"max_num_seqs": -1})


def test_configs_are_frozen_and_hashable_values() -> None:
    cfg = SageLLMConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model = ModelConfig()  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.dtype = "bfloat16"  # type: ignore[misc]
    assert SageLLMConfig.from_dict(CUSTOM) != cfg


def test_direct_construction_validates() -> None:
    with pytest.raises(ConfigError, match=r"model\.dtype"):
        ModelConfig(dtype="float64")
    with pytest.raises(ConfigError, match=r"kv_cache\.num_blocks"):
        KVCacheConfig(num_blocks=0)
    with pytest.raises(ConfigError, match=r"backend\.num_threads"):
        BackendConfig(num_threads=0)
    assert issubclass(ConfigError, ValueError)


def test_scheduler_limits() -> None:
    lim = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64).limits(2048)
    got = (lim.max_num_seqs, lim.max_num_batched_tokens, lim.max_model_len, lim.chunked_prefill)
    assert got == (8, 64, 2048, True)
    # without chunked prefill a whole prompt must fit in one step
    lim = SchedulerConfig(max_num_batched_tokens=64, chunked_prefill=False).limits(2048)
    assert lim.max_num_batched_tokens == 2048 and not lim.chunked_prefill


# ---- property: any valid config survives dict and YAML round trips -----------------------------

optional = lambda s: st.none() | s  # noqa: E731
configs = st.builds(
    SageLLMConfig,
    model=st.builds(ModelConfig,
                    model_id=optional(st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1,
                                              max_size=20)),
                    dtype=st.sampled_from(DTYPES), max_model_len=optional(st.integers(1, 1 << 20))),
    kv_cache=st.builds(KVCacheConfig, block_size=st.integers(1, 256),
                       num_blocks=optional(st.integers(1, 1 << 20)),
                       memory_gb=st.floats(1e-3, 1e3, allow_nan=False)),
    scheduler=st.builds(SchedulerConfig, max_num_seqs=st.integers(1, 4096),
                        max_num_batched_tokens=st.integers(1, 1 << 16), chunked_prefill=st.booleans()),
    backend=st.builds(BackendConfig, device=st.sampled_from(["auto", "cpu", "cuda", "cuda:1"]),
                      num_threads=optional(st.integers(1, 64)), seed=st.integers(0, 2**31),
                      kernels=st.booleans()),
)


@settings(max_examples=60, deadline=None)
@given(configs)
def test_round_trip_property(cfg: SageLLMConfig) -> None:
    d = cfg.to_dict()
    assert SageLLMConfig.from_dict(d) == cfg
    assert SageLLMConfig.from_dict(yaml.safe_load(yaml.safe_dump(d))) == cfg
    assert cfg.replace(**d) == cfg
