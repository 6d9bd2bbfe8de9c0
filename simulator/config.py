"""`SimulationConfig`: what `sagellm simulate CONFIG.yaml` reads. Errors name the field.

```yaml
name: azure-conv-a100
model: llama-2-7b            # a preset (sagellm.models.presets), a model path, or omitted: sagellm.model.model_id
hardware: a100-80gb-sxm      # a roofline spec (name or .yaml), a calibrated profile (.json), or "local"
sagellm: {scheduler: {max_num_seqs: 512, max_num_batched_tokens: 512}, model: {dtype: float16}}
cluster: {num_replicas: 1, router: round_robin}   # any of sagellm.core.policies.ROUTERS, or package.module:Class
workload: {...}              # simulator.workloads.WorkloadSpec
slo: {ttft_ms: 2000, tpot_ms: 100}
memory_utilization: 0.9      # fraction of device memory for weights + KV (roofline hardware)
kv_sample_interval: 1.0      # seconds between KV-usage samples
```
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sagellm.config import (
    MAX_WORKERS,
    ConfigError,
    SageLLMConfig,
    build_section,
    load_yaml_mapping,
    unknown_key_message,
)
from sagellm.core.policies import PolicyError, make_router
from sagellm.errors import show
from sagellm.metrics import SLO
from simulator.workloads import WorkloadError, WorkloadSpec

_KEYS = ("name", "model", "hardware", "sagellm", "cluster", "workload", "slo", "memory_utilization",
         "kv_sample_interval")


@dataclass(frozen=True)
class ClusterConfig:
    """Replicas behind a router: `router` is a registered router (`sagellm.core.policies.ROUTERS`)
    or 'package.module:Class', built with the keyword arguments `router_args`."""

    num_replicas: int = 1
    router: str = "round_robin"
    router_args: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.num_replicas <= MAX_WORKERS:
            raise ConfigError(f"cluster.num_replicas: must be in [1, {MAX_WORKERS}], got {self.num_replicas}")
        if self.router_args is not None and not (
                isinstance(self.router_args, dict) and all(isinstance(k, str) for k in self.router_args)):
            raise ConfigError("cluster.router_args: expected a mapping of keyword arguments, "
                              f"got {show(self.router_args)}")
        self.make_router()  # a name that does not resolve, or arguments the class refuses, fail here

    def make_router(self) -> Any:
        """A new router object (one per cluster: a router may keep state)."""
        try:
            return make_router(self.router, self.router_args, "cluster.router")
        except PolicyError as exc:
            raise ConfigError(str(exc)) from None


@dataclass(frozen=True)
class SLOConfig:
    """Latency objectives in milliseconds (null disables one)."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "tpot_ms"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(f"slo.{name}: must be > 0 or null, got {v}")

    def to_slo(self) -> SLO:
        return SLO(None if self.ttft_ms is None else self.ttft_ms / 1e3,
                   None if self.tpot_ms is None else self.tpot_ms / 1e3)


@dataclass(frozen=True)
class SimulationConfig:
    """A whole simulation; `base_dir` resolves relative paths (the config file's directory)."""

    workload: WorkloadSpec
    hardware: str = "local"
    model: str | None = None
    name: str = "simulation"
    sagellm: SageLLMConfig = field(default_factory=SageLLMConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    slo: SLOConfig = field(default_factory=SLOConfig)
    memory_utilization: float = 0.9
    kv_sample_interval: float = 1.0
    base_dir: Path = Path(".")

    @classmethod
    def from_dict(cls, data: Any, base_dir: str | Path = ".") -> SimulationConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"simulation config: expected a mapping, got {type(data).__name__}")
        unknown = [key for key in data if key not in _KEYS]
        if unknown:
            raise ConfigError(unknown_key_message(unknown[0], "", sorted(_KEYS)))
        if "workload" not in data:
            raise ConfigError("workload: missing; a simulation needs a workload (arrival, prompt_len, output_len)")
        for key in ("name", "hardware", "model"):
            if key in data and data[key] is not None and not isinstance(data[key], str):
                raise ConfigError(f"{key}: expected a string, got {show(data[key])}")
        if not data.get("hardware", "local"):
            raise ConfigError("hardware: must be a spec name, a spec/profile path, or 'local'")
        try:
            workload = WorkloadSpec.from_dict(data["workload"], "workload")
        except WorkloadError as exc:
            raise ConfigError(str(exc)) from exc
        mem = data.get("memory_utilization", 0.9)
        if isinstance(mem, bool) or not isinstance(mem, (int, float)) or not 0 < mem <= 1:
            raise ConfigError(f"memory_utilization: must be in (0, 1], got {show(mem)}")
        interval = data.get("kv_sample_interval", 1.0)
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or interval < 0:
            raise ConfigError(f"kv_sample_interval: must be a number >= 0, got {show(interval)}")
        return cls(
            workload=workload,
            hardware=data.get("hardware", "local"),
            model=data.get("model"),
            name=data.get("name", "simulation"),
            sagellm=SageLLMConfig.from_dict(_prefixed(data.get("sagellm"), "sagellm")),
            cluster=build_section(ClusterConfig, data.get("cluster") or {}, "cluster."),
            slo=build_section(SLOConfig, data.get("slo") or {}, "slo."),
            memory_utilization=float(mem),
            kv_sample_interval=float(interval),
            base_dir=Path(base_dir),
        )

    @classmethod
    def from_yaml(cls, path: str | Path) -> SimulationConfig:
        return cls.from_dict(load_yaml_mapping(path, "simulation config"), Path(path).parent)


def _prefixed(section: Any, name: str) -> Any:
    """`SageLLMConfig.from_dict` names fields without a prefix; re-raise with `sagellm.` in front."""
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ConfigError(f"{name}: expected a mapping, got {type(section).__name__}")
    try:
        SageLLMConfig.from_dict(section)
    except ConfigError as exc:
        raise ConfigError(f"{name}.{exc}") from exc
    return section
