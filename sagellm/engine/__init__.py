"""The live engine (torch): model runner, sampler, detokenizer, `SageLLMEngine` and `ClusterEngine`."""

from __future__ import annotations

from typing import Any

from sagellm.config import SageLLMConfig
from sagellm.core.pd import ScheduleMode
from sagellm.engine.cluster import ClusterEngine
from sagellm.engine.engine import SageLLMEngine, TokenStream
from sagellm.engine.types import GenerateOutput, GenerateRequest, RequestMetrics, StepTiming, StreamDelta


def create_engine(config: SageLLMConfig | None = None, num_replicas: int = 1, router: str = "least_outstanding",
                  router_args: dict[str, Any] | None = None) -> SageLLMEngine | ClusterEngine:
    """An uninitialized engine for `config`: a `ClusterEngine` for mode strict or several replicas
    (worker processes, placed by `router` built with `router_args`), else a `SageLLMEngine` in
    this process."""
    config = config or SageLLMConfig()
    if config.scheduler.schedule_mode is ScheduleMode.STRICT or num_replicas > 1:
        return ClusterEngine(config, num_replicas, router, router_args=router_args)
    return SageLLMEngine(config)


__all__ = ["ClusterEngine", "GenerateOutput", "GenerateRequest", "RequestMetrics", "SageLLMEngine", "StepTiming",
           "StreamDelta", "TokenStream", "create_engine"]
