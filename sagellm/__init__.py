"""sagellm: an LLM-serving research testbed.

One policy layer (`sagellm.core`) drives a live engine (`sagellm.engine`) and a SimPy simulator.
The engine classes are imported lazily so that `import sagellm.core` never pulls in torch.
"""

from sagellm.config import (
    BackendConfig,
    BenchmarkConfig,
    ConfigError,
    KVCacheConfig,
    ModelConfig,
    SageLLMConfig,
    SchedulerConfig,
)

__version__ = "0.1.0"

_ENGINE_NAMES = {"SageLLMEngine", "GenerateRequest", "GenerateOutput", "RequestMetrics", "StreamDelta"}


def __getattr__(name: str):
    if name in _ENGINE_NAMES:
        import sagellm.engine as engine

        return getattr(engine, name)
    raise AttributeError(f"module 'sagellm' has no attribute {name!r}")


__all__ = [
    "BackendConfig",
    "BenchmarkConfig",
    "ConfigError",
    "KVCacheConfig",
    "ModelConfig",
    "SageLLMConfig",
    "SchedulerConfig",
    *sorted(_ENGINE_NAMES),
]
