"""`SageLLMConfig` and its parts: YAML or dict in, dict out, validated with errors that name the field.

The same config object builds the live engine and (later) the simulator, so the policy settings a
study varies are written once.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sagellm.core.kv.tiers import KVGranularity, KVPolicy, check_tiering_fields
from sagellm.core.pd import InferenceMode, ScheduleMode, resolve_modes
from sagellm.core.policies import PolicyError, make_scheduling_policy
from sagellm.core.scheduler import SchedulerLimits
from sagellm.errors import ConfigError, show
from sagellm.yaml_files import load_yaml_mapping

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelConfig:
    """Which model to serve. `model_id` None serves the embedded SmolLM2-135M-Instruct; a path
    loads a GGUF file or a Hugging Face directory (config.json + *.safetensors). Nothing is
    downloaded. `max_model_len` None takes the model's context length."""

    model_id: str | None = None
    dtype: str = "float32"
    max_model_len: int | None = 2048

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"model.dtype: {show(self.dtype)} is not one of {DTYPES}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ConfigError(f"model.max_model_len: must be > 0 or null, got {self.max_model_len}")


# Bounds that no real deployment reaches and that keep a typo from allocating without limit: vLLM
# uses blocks of 1-256 tokens; 2**24 blocks of the smallest model's KV is already tens of GiB.
MAX_BLOCK_SIZE = 1024
MAX_KV_BLOCKS = 2**24
# A simulated STRICT cluster may be large; a live one spawns a process per worker (see ClusterEngine).
MAX_WORKERS = 4096
MAX_THREADS = 1024
MAX_REPEATS = 1000


def _blocks_within_cap(blocks: int, field_name: str, gib: float, minimum: int) -> int:
    if blocks > MAX_KV_BLOCKS:
        raise ConfigError(f"kv_cache.{field_name}: {gib} GiB is {blocks} blocks, more than {MAX_KV_BLOCKS}; "
                          "use fewer GiB or a larger kv_cache.block_size")
    return max(minimum, blocks)


@dataclass(frozen=True)
class KVCacheConfig:
    """The paged KV pool and the KV runtime around it.

    `num_blocks` None sizes the device pool from `memory_gb` (GiB of K and V over all layers) and
    the model's shape and dtype. `enable_prefix_caching` reuses full blocks across requests
    (`tenant_isolation`: only within a request's tenant). The lower tiers hold cached blocks
    evicted from the device: DDR (host memory) of `ddr_num_blocks` blocks or `ddr_memory_gb` GiB,
    NVMe (a file under `nvme_path`, a fresh temporary directory when None) of `nvme_num_blocks`
    or `nvme_memory_gb`; 0 disables a tier. `eviction_policy` ("lru", "lfu" or 'package.module:Class',
    built with `eviction_policy_args`) picks which cached
    block leaves a full tier; `cold_timeout_s` moves idle cached blocks down a tier ahead of need
    (null: never); blocks hit `hot_access_threshold` times are hot (kept, and promoted from NVMe
    to free DDR, at most `max_promotions_per_step` per step). `granularity`: "block", "request"
    (preempted requests are swapped to DDR instead of recomputed) or "layer"."""

    block_size: int = 16
    num_blocks: int | None = None
    memory_gb: float = 1.0
    enable_prefix_caching: bool = False
    tenant_isolation: bool = False
    granularity: str = "block"
    ddr_num_blocks: int | None = None
    ddr_memory_gb: float = 0.0
    nvme_num_blocks: int | None = None
    nvme_memory_gb: float = 0.0
    nvme_path: str | None = None
    eviction_policy: str = "lru"
    cold_timeout_s: float | None = 60.0
    hot_access_threshold: int = 2
    max_promotions_per_step: int = 8
    eviction_policy_args: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.block_size <= MAX_BLOCK_SIZE:
            raise ConfigError(f"kv_cache.block_size: must be in [1, {MAX_BLOCK_SIZE}] tokens, got {self.block_size}")
        for name in ("num_blocks", "ddr_num_blocks", "nvme_num_blocks"):
            value, low = getattr(self, name), 1 if name == "num_blocks" else 0
            if value is not None and not low <= value <= MAX_KV_BLOCKS:
                raise ConfigError(f"kv_cache.{name}: must be in [{low}, {MAX_KV_BLOCKS}] or null, got {value}")
        for name in ("memory_gb", "ddr_memory_gb", "nvme_memory_gb"):
            value, low = getattr(self, name), "> 0" if name == "memory_gb" else ">= 0"
            if not math.isfinite(value) or value < 0 or (value == 0 and name == "memory_gb"):
                raise ConfigError(f"kv_cache.{name}: must be a finite number {low} (GiB), got {value}")
        granularities = tuple(g.value for g in KVGranularity)
        if self.granularity not in granularities:
            raise ConfigError(f"kv_cache.granularity: {show(self.granularity)} is not one of {granularities}")
        try:
            check_tiering_fields(self.eviction_policy, self.cold_timeout_s, self.hot_access_threshold,
                                 self.max_promotions_per_step, self.eviction_policy_args)
        except ValueError as exc:
            raise ConfigError(f"kv_cache.{exc}") from None

    def device_blocks(self, block_bytes: int) -> int:
        """Blocks of the device pool for blocks of `block_bytes` bytes: `num_blocks`, else as many as
        `memory_gb` holds (at least 1). ConfigError naming the field when that exceeds MAX_KV_BLOCKS."""
        if self.num_blocks is not None:
            return self.num_blocks
        return _blocks_within_cap(int(self.memory_gb * 2**30 // block_bytes), "memory_gb", self.memory_gb, 1)

    def tier_blocks(self, block_bytes: int) -> tuple[int, int]:
        """(DDR blocks, NVMe blocks) for blocks of `block_bytes` bytes; ConfigError naming the field
        when a tier sized in GiB would exceed MAX_KV_BLOCKS blocks."""
        def size(blocks: int | None, gib: float, name: str) -> int:
            if blocks is not None:
                return blocks
            return _blocks_within_cap(int(gib * 2**30 // block_bytes), name, gib, 0)
        return (size(self.ddr_num_blocks, self.ddr_memory_gb, "ddr_memory_gb"),
                size(self.nvme_num_blocks, self.nvme_memory_gb, "nvme_memory_gb"))

    def policy(self, block_bytes: int) -> KVPolicy:
        """The policy layer's view of these settings, for blocks of `block_bytes` bytes."""
        ddr, nvme = self.tier_blocks(block_bytes)
        try:
            return KVPolicy(
                enable_prefix_caching=self.enable_prefix_caching, tenant_isolation=self.tenant_isolation,
                granularity=KVGranularity(self.granularity), ddr_blocks=ddr, nvme_blocks=nvme,
                eviction_policy=self.eviction_policy, cold_timeout_s=self.cold_timeout_s,
                hot_access_threshold=self.hot_access_threshold, max_promotions_per_step=self.max_promotions_per_step,
                eviction_policy_args=self.eviction_policy_args,
            )
        except ValueError as exc:
            raise ConfigError(f"kv_cache: {exc}") from None


@dataclass(frozen=True)
class SchedulerConfig:
    """Batching and prefill/decode scheduling.

    At most `max_num_seqs` running requests (the batch size) and `max_num_batched_tokens` tokens
    per step, of which at most `max_prefill_batch` prefill rows and `max_decode_batch` decode rows
    (null: no cap of their own); prompts are split into chunks when `chunked_prefill` is on.
    `mode` (`ScheduleMode`): "hybrid" mixes prefill chunks and decodes in one step; "time_share"
    alternates prefill-only and decode-only steps, running `time_share_decode_steps` decode steps
    between two prefill steps while both kinds of work wait (0: prefill first); "strict" separates
    `prefill_workers` prefill workers from `decode_workers` decode workers, with the KV handed
    from one to the other. `inference_mode`: "standard", "pd_separate" (= mode strict), or the
    role of one worker, "prefill_only" / "decode_only". `retry_on_worker_failure`: requests of a
    worker that dies are run again on the others (else they fail with an error). `policy`: the
    scheduling policy that orders admission and picks preemption victims, a registered name
    (`fcfs`, `priority`, `sjf`, `srpt_oracle`, `fair`) or a class of one's own as
    'package.module:Class', built with the keyword arguments `policy_args` (docs/policies.md)."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    chunked_prefill: bool = True
    max_prefill_batch: int | None = 8
    max_decode_batch: int | None = 64
    mode: str = "hybrid"
    inference_mode: str = "standard"
    time_share_decode_steps: int = 0
    prefill_workers: int = 1
    decode_workers: int = 1
    retry_on_worker_failure: bool = False
    policy: str = "fcfs"
    policy_args: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        try:
            resolve_modes(self.mode, self.inference_mode)
        except ValueError as exc:
            raise ConfigError(f"scheduler.{exc}") from None
        if self.policy_args is not None and not (
                isinstance(self.policy_args, dict) and all(isinstance(k, str) for k in self.policy_args)):
            raise ConfigError(f"scheduler.policy_args: expected a mapping of keyword arguments, "
                              f"got {show(self.policy_args)}")
        self.make_policy()  # a name that does not resolve, or arguments the class refuses, fail here
        for name in ("max_prefill_batch", "max_decode_batch"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"scheduler.{name}: must be > 0 or null, got {getattr(self, name)}")
        for name in ("prefill_workers", "decode_workers"):
            if not 1 <= getattr(self, name) <= MAX_WORKERS:
                raise ConfigError(f"scheduler.{name}: must be in [1, {MAX_WORKERS}], got {getattr(self, name)}")
        if self.time_share_decode_steps < 0:
            raise ConfigError(f"scheduler.time_share_decode_steps: must be >= 0, got {self.time_share_decode_steps}")
        if self.max_num_seqs <= 0:
            raise ConfigError(f"scheduler.max_num_seqs: must be > 0, got {self.max_num_seqs}")
        if self.max_num_batched_tokens <= 0:
            raise ConfigError(
                f"scheduler.max_num_batched_tokens: must be > 0, got {self.max_num_batched_tokens}"
            )

    def make_policy(self) -> Any:
        """A new scheduling-policy object (one per scheduler: a policy may keep state)."""
        try:
            return make_scheduling_policy(self.policy, self.policy_args, "scheduler.policy")
        except PolicyError as exc:
            raise ConfigError(str(exc)) from None

    @property
    def schedule_mode(self) -> ScheduleMode:
        return resolve_modes(self.mode, self.inference_mode)[0]

    @property
    def role(self) -> InferenceMode:
        """The role of a single worker built from this config (STANDARD for hybrid, time_share and
        for the coordinator of a strict cluster, which gives its workers their roles)."""
        im = InferenceMode(self.inference_mode)
        return im if im in (InferenceMode.PREFILL_ONLY, InferenceMode.DECODE_ONLY) else InferenceMode.STANDARD

    def limits(self, max_model_len: int, role: InferenceMode | None = None) -> SchedulerLimits:
        """The policy layer's limits for one worker of role `role` (None: `self.role`)."""
        budget = self.max_num_batched_tokens
        if not self.chunked_prefill:
            budget = max(budget, max_model_len)
        return SchedulerLimits(
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=budget,
            max_model_len=max_model_len,
            chunked_prefill=self.chunked_prefill,
            max_prefill_batch=self.max_prefill_batch,
            max_decode_batch=self.max_decode_batch,
            time_share=self.schedule_mode is ScheduleMode.TIME_SHARE,
            time_share_decode_steps=self.time_share_decode_steps,
            role=role or self.role,
        )


@dataclass(frozen=True)
class BackendConfig:
    """Where the model runs. `device` "auto" takes CUDA when present, else the CPU; "cpu", "cuda"
    and "cuda:N" force one. `num_threads` None leaves torch's intra-op thread count as it is.
    `kernels` uses sagellm's CPU accelerations when available: the compiled paged-attention kernel
    and oneDNN pre-packed bfloat16 weights (else pure torch, same results).
    `seed` seeds the random draws of sampled requests that bring no seed of their own."""

    device: str = "auto"
    num_threads: int | None = None
    seed: int = 0
    kernels: bool = True

    def __post_init__(self) -> None:
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"backend.device: {show(self.device)} is not one of auto, cpu, cuda, cuda:N")
        if self.num_threads is not None and not 1 <= self.num_threads <= MAX_THREADS:
            raise ConfigError(f"backend.num_threads: must be in [1, {MAX_THREADS}] or null, got {self.num_threads}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"backend.seed: must be in [0, 2**63), got {self.seed}")


@dataclass(frozen=True)
class BenchmarkConfig:
    """Benchmark repetition and CI gates: a run fails a gate when its throughput is below
    `min_output_tokens_per_s` or its mean TTFT / TPOT exceed the maxima (None disables a gate)."""

    warmup_runs: int = 1
    repeats: int = 3
    min_output_tokens_per_s: float | None = None
    max_mean_ttft_ms: float | None = None
    max_mean_tpot_ms: float | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.warmup_runs <= MAX_REPEATS:
            raise ConfigError(f"benchmark.warmup_runs: must be in [0, {MAX_REPEATS}], got {self.warmup_runs}")
        if not 1 <= self.repeats <= MAX_REPEATS:
            raise ConfigError(f"benchmark.repeats: must be in [1, {MAX_REPEATS}], got {self.repeats}")


@dataclass(frozen=True)
class SageLLMConfig:
    """The whole configuration. `SageLLMConfig()` serves the embedded default model on the CPU."""

    model: ModelConfig = field(default_factory=ModelConfig)
    kv_cache: KVCacheConfig = field(default_factory=KVCacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> SageLLMConfig:
        return _build(cls, data or {}, prefix="")

    @classmethod
    def from_yaml(cls, path: str | Path) -> SageLLMConfig:
        return cls.from_dict(load_yaml_mapping(path, "config file"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **sections: Any) -> SageLLMConfig:
        """A copy with some fields changed, e.g. `replace(model={"dtype": "bfloat16"})`."""
        merged = self.to_dict()
        for name, values in sections.items():
            if name not in merged:
                raise ConfigError(f"unknown config section {show(name)}; allowed: {sorted(merged)}")
            merged[name].update(values)
        return SageLLMConfig.from_dict(merged)


def build_section(cls: type, data: Any, prefix: str) -> Any:
    """Build the frozen dataclass `cls` from a mapping, with `ConfigError`s naming `prefix`+field.

    Other config files (simulations, experiments) use it for their own sections.
    """
    return _build(cls, data, prefix)


def unknown_key_message(key: Any, prefix: str, allowed: list[str]) -> str:
    """'<prefix><key>: unknown key; allowed keys in <section>: [...]', or, for a key that is not a
    plain name (empty, not a string, odd characters), '<section>: unknown key <repr>; ...'."""
    where = prefix.rstrip(".") or "config"
    if isinstance(key, str) and key.isidentifier():
        return f"{prefix}{key}: unknown key; allowed keys in {where}: {allowed}"
    return f"{where}: unknown key {show(key)}; allowed keys: {allowed}"


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = [key for key in data if key not in known]
    if unknown:
        raise ConfigError(unknown_key_message(unknown[0], prefix, sorted(known)))
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(hints[name], value, f"{prefix}{name}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _convert(hint: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where + ".")
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {show(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {show(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {show(value)}")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{where}: expected a finite number, got {show(value)}")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {show(value)}")
        return value
    return value
