"""Open-loop replay: submit requests to a running engine at given times, whatever it is doing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from sagellm.engine.types import GenerateOutput, GenerateRequest


def replay(engine, timed_requests: Sequence[tuple[float, GenerateRequest]], timeout_s: float = 1800.0
           ) -> tuple[list[GenerateOutput], float]:
    """Submit each request `at` seconds after the start (sorted by time) through the engine's async
    API and wait for all of them. Returns the outputs in submission order and the start time on the
    engine's clock (`time.monotonic`). A slow engine does not delay later submissions (open loop).
    Raises TimeoutError after `timeout_s`.
    """
    return asyncio.run(asyncio.wait_for(_replay(engine, timed_requests), timeout_s))


async def _replay(engine, timed_requests: Sequence[tuple[float, GenerateRequest]]
                  ) -> tuple[list[GenerateOutput], float]:
    start = time.monotonic()
    tasks = []
    for at, req in timed_requests:
        delay = start + at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(engine.generate_async(req)))
    return list(await asyncio.gather(*tasks)), start
