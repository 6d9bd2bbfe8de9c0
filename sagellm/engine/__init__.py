"""The live engine (torch): model runner, sampler, detokenizer and `SageLLMEngine`."""

from sagellm.engine.engine import SageLLMEngine, TokenStream
from sagellm.engine.types import GenerateOutput, GenerateRequest, RequestMetrics, StreamDelta

__all__ = ["GenerateOutput", "GenerateRequest", "RequestMetrics", "SageLLMEngine", "StreamDelta", "TokenStream"]
