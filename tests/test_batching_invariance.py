"""Batching changes nothing: greedy tokens do not depend on what else is in the batch.

Every run below is compared with the same 16 prompts run one at a time on the default engine
(`greedy_alone`, shared with the reference test): a 16-request `generate_batch`, 16 staggered
`generate_async` calls (requests join a batch that is already decoding), a run on a KV pool so small
that requests are preempted and recomputed, and a run with 16-token chunked prefill.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import run_with_timeout, start_engine
from prompts import BATCH_PROMPTS

from sagellm.engine import GenerateOutput, GenerateRequest

pytestmark = pytest.mark.slow  # the 16 one-by-one runs take ~30-40 s on 2 cores

NEW_TOKENS = 24
NAMES = [name for name, _ in BATCH_PROMPTS]
FIELDS = dict(BATCH_PROMPTS)


def _request(name: str, tag: str, max_new_tokens: int = NEW_TOKENS) -> GenerateRequest:
    return GenerateRequest(**FIELDS[name], request_id=f"{tag}-{name}", max_new_tokens=max_new_tokens,
                           temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def alone(greedy_alone: Any) -> dict[str, GenerateOutput]:
    """name -> that prompt's output when run alone (32 tokens; the first 24 are compared)."""
    return {name: greedy_alone(FIELDS[name]) for name in NAMES}


def _assert_same_as_alone(outputs: list[GenerateOutput], names: list[str], alone: dict[str, GenerateOutput],
                          n: int = NEW_TOKENS) -> None:
    assert len(outputs) == len(names)
    diffs = []
    for name, out in zip(names, outputs, strict=True):
        assert out.finish_reason == "length", (name, out.finish_reason, out.error)
        assert len(out.token_ids) == n, name
        assert out.prompt_token_ids == alone[name].prompt_token_ids, name
        want = alone[name].token_ids[:n]
        if out.token_ids != want:
            k = next(i for i, (a, b) in enumerate(zip(out.token_ids, want, strict=True)) if a != b)
            diffs.append(f"{name}: first difference at token {k}: {out.token_ids} vs alone {want}")
    assert not diffs, "\n".join(diffs)


def test_prompts_cover_lengths(alone: dict[str, GenerateOutput]) -> None:
    lengths = sorted(len(o.prompt_token_ids) for o in alone.values())
    assert len(set(NAMES)) == 16
    assert lengths[0] <= 5 and lengths[-1] >= 150, lengths
    # the outputs differ from each other, so a mix-up of requests in a batch would be caught
    assert len({o.token_ids[:NEW_TOKENS] for o in alone.values()}) == 16


def test_generate_batch_equals_alone(engine: Any, alone: dict[str, GenerateOutput]) -> None:
    steps0 = engine.get_stats()["steps"]
    outs = run_with_timeout(lambda: engine.generate_batch([_request(n, "batch") for n in NAMES]), 120)
    _assert_same_as_alone(outs, NAMES, alone)
    # they really were batched: 16 x 24 tokens in far fewer steps than 16 x 24
    assert engine.get_stats()["steps"] - steps0 <= 3 * NEW_TOKENS


def test_staggered_generate_async_equals_alone(engine: Any, alone: dict[str, GenerateOutput]) -> None:
    """Half the requests start together, the rest arrive one by one while those decode, so prefills
    and decodes of different requests share steps."""

    async def one(i: int, name: str) -> GenerateOutput:
        if i % 2:
            await asyncio.sleep(0.05 * i)
        return await engine.generate_async(_request(name, "async"))

    async def main() -> list[GenerateOutput]:
        return await asyncio.wait_for(asyncio.gather(*(one(i, n) for i, n in enumerate(NAMES))), 120)

    outs = asyncio.run(main())
    _assert_same_as_alone(outs, NAMES, alone)
    assert all(o.request_id == f"async-{n}" for o, n in zip(outs, NAMES, strict=True))


def test_preemption_changes_nothing(small_kv_engine: Any, alone: dict[str, GenerateOutput]) -> None:
    eng = small_kv_engine
    stats0 = eng.get_stats()
    # 16 requests need ~110 blocks of 16 tokens; the pool has 40, each request alone fits.
    assert stats0["kv_num_blocks"] * stats0["kv_block_size"] < sum(
        len(o.prompt_token_ids) + NEW_TOKENS for o in alone.values()
    )
    assert max(len(o.prompt_token_ids) + NEW_TOKENS for o in alone.values()) <= stats0["kv_capacity_tokens"]
    outs = run_with_timeout(lambda: eng.generate_batch([_request(n, "preempt") for n in NAMES]), 180)
    stats = eng.get_stats()
    assert stats["num_preemptions"] > stats0["num_preemptions"], "the run was meant to preempt"
    assert any(o.metrics.num_preemptions > 0 for o in outs)
    _assert_same_as_alone(outs, NAMES, alone)
    # every block is back in the pool afterwards
    assert stats["kv_free_blocks"] == stats["kv_num_blocks"]
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0


@pytest.fixture(scope="module")
def chunked_engine() -> Iterator[Any]:
    """At most 16 tokens per step: every prompt longer than that is prefilled in chunks, interleaved
    with the decodes of the other requests."""
    eng = start_engine({
        "model": {"dtype": "float32"},
        "kv_cache": {"num_blocks": 128, "block_size": 16},
        "scheduler": {"max_num_batched_tokens": 16, "chunked_prefill": True},
    })
    yield eng
    eng.shutdown()


def test_chunked_prefill_changes_nothing(chunked_engine: Any, alone: dict[str, GenerateOutput]) -> None:
    long_names = [n for n in NAMES if len(alone[n].prompt_token_ids) >= 60]
    short_names = ["raw_hi", "raw_fox"]
    assert len(long_names) >= 4, long_names
    names = short_names + long_names  # short ones decode while the long ones prefill chunk by chunk
    n = NEW_TOKENS
    outs = run_with_timeout(
        lambda: chunked_engine.generate_batch([_request(x, "chunk", max_new_tokens=n) for x in names]), 180
    )
    _assert_same_as_alone(outs, names, alone, n=n)
    # a single step never held more than 16 tokens, so the long prompts needed several steps each
    stats = chunked_engine.get_stats()
    assert stats["steps"] >= sum(len(alone[x].prompt_token_ids) for x in long_names) / 16
