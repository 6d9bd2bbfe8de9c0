"""The policy layer: requests, scheduling and KV-cache decisions.

Standard library only (a test enforces it) and clock-free: every method that needs the time takes
`now` as an argument. The live engine and the simulator both drive these same objects.
"""

from sagellm.core.kv import BlockPool, KVCacheManager, blocks_for_tokens
from sagellm.core.outputs import ScheduledRequest, SchedulerOutput, StepResult
from sagellm.core.request import Request, RequestStatus
from sagellm.core.sampling import SamplingParams
from sagellm.core.scheduler import Scheduler, SchedulerLimits

__all__ = [
    "BlockPool",
    "KVCacheManager",
    "Request",
    "RequestStatus",
    "SamplingParams",
    "ScheduledRequest",
    "Scheduler",
    "SchedulerLimits",
    "SchedulerOutput",
    "StepResult",
    "blocks_for_tokens",
]
