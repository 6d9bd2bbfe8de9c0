"""The engine's public API: outputs and metrics, streaming (sync and async), concurrency on one engine
thread, stop strings and stop tokens, length limits, seeded sampling, aborts, stats and dtypes."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
from conftest import run_with_timeout, start_engine, wait_until

from sagellm.engine import GenerateOutput, GenerateRequest, StreamDelta, TokenStream

CHAT = ({"role": "user", "content": "What is the capital of France?"},)
# A raw prompt whose greedy continuation is long, varied text (no early eos with ignore_eos anyway).
STORY = "Once upon a time, in a small village nestled between the mountains, there lived"


def greedy(prompt: str = STORY, n: int = 24, **kw: Any) -> GenerateRequest:
    return GenerateRequest(prompt=prompt, max_new_tokens=n, temperature=0.0, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def story(engine: Any) -> GenerateOutput:
    """The greedy 24-token continuation of STORY, used as the reference of several tests."""
    out = engine.generate(greedy())
    assert out.finish_reason == "length" and len(out.token_ids) == 24
    return out


def assert_idle(engine: Any) -> None:
    """No request is left in the engine and every KV block is free again."""
    assert wait_until(lambda: not engine.scheduler.has_unfinished(), 10), "requests left in the scheduler"
    stats = engine.get_stats()
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0
    assert stats["kv_free_blocks"] == stats["kv_num_blocks"], "KV blocks leaked"
    assert not engine._pending, "engine still tracks finished requests"


# ---- generate ------------------------------------------------------------------------------


def test_generate_output_and_metrics(engine: Any) -> None:
    out = engine.generate(GenerateRequest(messages=CHAT, max_new_tokens=20, temperature=0.0))
    assert isinstance(out, GenerateOutput)
    assert out.error is None
    assert out.finish_reason in ("stop", "length")
    assert 0 < len(out.token_ids) <= 20
    assert "Paris" in out.text
    assert out.text == engine.tokenizer.decode(out.token_ids)
    if out.finish_reason == "stop":  # ended by eos, which is kept in token_ids
        assert out.token_ids[-1] in engine.eos_token_ids
    m = out.metrics
    assert m is not None
    assert m.num_prompt_tokens == len(out.prompt_token_ids) > 20  # the chat template was applied
    assert m.num_output_tokens == len(out.token_ids)
    assert m.ttft > 0 and m.tpot > 0 and m.queue_time >= 0
    assert m.e2e_latency >= m.ttft
    assert len(m.inter_token_latencies) == m.num_output_tokens - 1
    assert m.tpot == pytest.approx(sum(m.inter_token_latencies) / len(m.inter_token_latencies))
    assert m.e2e_latency == pytest.approx(m.ttft + sum(m.inter_token_latencies), abs=0.05)
    assert out.throughput_tokens_per_s > 0


def test_plain_string_prompt_with_keyword_options(engine: Any, story: GenerateOutput) -> None:
    out = engine.generate(STORY, max_new_tokens=24, temperature=0.0, ignore_eos=True)
    assert out.token_ids == story.token_ids
    assert out.prompt_token_ids == tuple(engine.tokenizer.encode(STORY))


def test_prompt_token_ids_equal_text_prompt(engine: Any, story: GenerateOutput) -> None:
    out = engine.generate(GenerateRequest(prompt_token_ids=story.prompt_token_ids, max_new_tokens=24,
                                          temperature=0.0, ignore_eos=True))
    assert out.token_ids == story.token_ids and out.text == story.text


def test_max_new_tokens_gives_length_with_exactly_that_many(engine: Any, story: GenerateOutput) -> None:
    for n in (1, 7):
        out = engine.generate(greedy(n=n))
        assert out.finish_reason == "length"
        assert len(out.token_ids) == n
        assert out.token_ids == story.token_ids[:n]
        assert out.metrics.num_output_tokens == n
    assert out.metrics.tpot > 0


def test_request_ids_are_kept_and_default_unique(engine: Any) -> None:
    a, b = engine.generate_batch([greedy(n=2), greedy(n=2, request_id="mine")])
    assert b.request_id == "mine"
    assert a.request_id and a.request_id != "mine"
    assert GenerateRequest(prompt="x").request_id != GenerateRequest(prompt="x").request_id


# ---- streaming -----------------------------------------------------------------------------


def test_sync_stream_concatenates_to_final_text(engine: Any, story: GenerateOutput) -> None:
    stream = engine.generate_stream(greedy())
    assert isinstance(stream, TokenStream)
    deltas: list[StreamDelta] = run_with_timeout(lambda: list(stream), 60)
    assert len(deltas) >= 5, "tokens should arrive incrementally, not in one piece"
    assert all(not d.finished for d in deltas[:-1]) and deltas[-1].finished
    final = deltas[-1].output
    assert final is not None and stream.output == final
    assert final.finish_reason == "length"
    assert "".join(d.text for d in deltas) == final.text
    assert tuple(t for d in deltas for t in d.token_ids) == final.token_ids
    assert final.token_ids == story.token_ids and final.text == story.text
    assert all(d.request_id == final.request_id for d in deltas)
    assert_idle(engine)


def test_async_stream(engine: Any, story: GenerateOutput) -> None:
    async def main() -> list[StreamDelta]:
        out = []
        async for d in engine.generate_stream(greedy()):
            out.append(d)
        return out

    deltas = asyncio.run(asyncio.wait_for(main(), 60))
    assert deltas[-1].finished and not any(d.finished for d in deltas[:-1])
    final = deltas[-1].output
    assert "".join(d.text for d in deltas) == final.text == story.text
    assert final.token_ids == story.token_ids


def test_stream_with_stop_string_never_shows_the_stop_string(engine: Any, story: GenerateOutput) -> None:
    stop = _stop_string(story.text)
    deltas = run_with_timeout(lambda: list(engine.generate_stream(greedy(stop=(stop,)))), 60)
    final = deltas[-1].output
    assert final.finish_reason == "stop"
    text = "".join(d.text for d in deltas)
    assert text == final.text == story.text[: story.text.index(stop)]
    assert stop not in text


def test_breaking_out_of_a_sync_stream_aborts_the_request(engine: Any) -> None:
    stats0 = engine.get_stats()
    req = greedy(n=1000)
    seen = 0
    for _delta in engine.generate_stream(req):
        seen += 1
        if seen == 3:
            break
    # the stream's generator is closed when the loop drops it, which sends the abort
    assert wait_until(lambda: not engine.scheduler.has_unfinished(), 10), "request kept running"
    assert wait_until(lambda: engine.get_stats()["finished"] == stats0["finished"] + 1, 5)
    assert engine.get_stats()["output_tokens"] - stats0["output_tokens"] < 1000
    assert_idle(engine)


# ---- concurrency ---------------------------------------------------------------------------


def test_concurrent_async_requests_share_one_engine_thread(engine: Any) -> None:
    n_req, n_tok = 12, 12
    prompts = [f"Fact number {i} about the sea is that" for i in range(n_req)]
    stats0 = engine.get_stats()
    threads0 = threading.active_count()
    peak = [threads0]

    async def watch(stop: asyncio.Event) -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], threading.active_count())
            await asyncio.sleep(0.01)

    async def main() -> list[GenerateOutput]:
        stop = asyncio.Event()
        watcher = asyncio.create_task(watch(stop))
        outs = await asyncio.gather(*(engine.generate_async(greedy(p, n_tok)) for p in prompts))
        stop.set()
        await watcher
        return outs

    outs = asyncio.run(asyncio.wait_for(main(), 120))
    assert all(o.finish_reason == "length" and len(o.token_ids) == n_tok for o in outs)
    assert len({o.request_id for o in outs}) == n_req
    # no thread per request: the one engine thread serves them all
    assert peak[0] - threads0 < 3, (threads0, peak[0])
    # and it batched them: 144 output tokens in about 12-15 steps, not 144
    stats = engine.get_stats()
    steps = stats["steps"] - stats0["steps"]
    tokens = stats["output_tokens"] - stats0["output_tokens"]
    assert tokens == n_req * n_tok
    assert steps <= tokens / 4, (steps, tokens)
    assert_idle(engine)


def test_concurrent_sync_callers_from_threads(engine: Any, story: GenerateOutput) -> None:
    results: list[GenerateOutput] = []
    lock = threading.Lock()

    def call() -> None:
        out = engine.generate(greedy())
        with lock:
            results.append(out)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 4
    assert all(r.token_ids == story.token_ids for r in results)


# ---- stopping ------------------------------------------------------------------------------


def _stop_string(text: str) -> str:
    """A word from the middle of `text` (first occurring after a few tokens)."""
    words = [w for w in text.split() if len(w) >= 4 and w.isalpha()]
    assert words, text
    word = words[min(2, len(words) - 1)]
    assert text.index(word) > 5, text
    return word


def test_stop_string_ends_generation_without_it(engine: Any, story: GenerateOutput) -> None:
    stop = _stop_string(story.text)
    out = engine.generate(greedy(stop=(stop, "no-such-string-xyz")))
    assert out.finish_reason == "stop"
    assert stop not in out.text
    assert out.text == story.text[: story.text.index(stop)]
    assert len(out.token_ids) < len(story.token_ids)
    assert out.token_ids == story.token_ids[: len(out.token_ids)]


def test_stop_token_ids(engine: Any, story: GenerateOutput) -> None:
    k = 5
    tok = story.token_ids[k]
    first = story.token_ids.index(tok)  # the stop token may also occur earlier
    out = engine.generate(greedy(stop_token_ids=(tok,)))
    assert out.finish_reason == "stop"
    assert out.token_ids == story.token_ids[: first + 1]  # the stop token is kept, like eos


def test_eos_stops_unless_ignored(engine: Any) -> None:
    out = engine.generate(GenerateRequest(messages=CHAT, max_new_tokens=64, temperature=0.0))
    assert out.finish_reason == "stop", "SmolLM2 answers this in a few tokens then emits <|im_end|>"
    assert out.token_ids[-1] in engine.eos_token_ids
    assert "<|im_end|>" not in out.text
    assert len(out.token_ids) < 64
    # with ignore_eos the same tokens come first, eos included, and generation goes on to the limit
    n = len(out.token_ids) + 4
    more = engine.generate(GenerateRequest(messages=CHAT, max_new_tokens=n, temperature=0.0, ignore_eos=True))
    assert more.finish_reason == "length" and len(more.token_ids) == n
    assert more.token_ids[: len(out.token_ids)] == out.token_ids


# ---- sampling ------------------------------------------------------------------------------


def _sampled(seed: int | None, **kw: Any) -> GenerateRequest:
    return GenerateRequest(prompt=STORY, max_new_tokens=16, temperature=0.8, seed=seed, ignore_eos=True, **kw)


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(engine: Any, story: GenerateOutput) -> None:
    a = engine.generate(_sampled(123))
    b = engine.generate(_sampled(123))
    assert a.token_ids == b.token_ids
    others = [_sampled(7), greedy("The ocean is", 16), _sampled(None), _sampled(123, top_p=0.9)]
    batch = engine.generate_batch([*others[:2], _sampled(123, request_id="seeded"), *others[2:]])
    assert batch[2].request_id == "seeded"
    assert batch[2].token_ids == a.token_ids
    # Not vacuous: the draws are random (another seed differs) and differ from greedy
    assert batch[0].token_ids != a.token_ids
    assert a.token_ids != story.token_ids[:16]


def test_top_k_1_equals_greedy(engine: Any, story: GenerateOutput) -> None:
    out = engine.generate(GenerateRequest(prompt=STORY, max_new_tokens=24, temperature=0.8, top_k=1,
                                          seed=5, ignore_eos=True))
    assert out.token_ids == story.token_ids


def test_tiny_top_p_equals_greedy(engine: Any, story: GenerateOutput) -> None:
    out = engine.generate(GenerateRequest(prompt=STORY, max_new_tokens=24, temperature=1.0, top_p=1e-6,
                                          seed=5, ignore_eos=True))
    assert out.token_ids == story.token_ids


# ---- abort ---------------------------------------------------------------------------------


def test_abort_a_long_generation(engine: Any) -> None:
    req = greedy(n=1500, request_id="to-abort")

    async def main() -> GenerateOutput:
        task = asyncio.create_task(engine.generate_async(req))
        while not (r := engine.scheduler.requests.get("to-abort")) or not r.output_token_ids:
            await asyncio.sleep(0.02)
        engine.abort("to-abort")
        return await asyncio.wait_for(task, 10)

    t0 = time.monotonic()
    out = asyncio.run(asyncio.wait_for(main(), 60))
    assert out.finish_reason == "abort"
    assert 0 < len(out.token_ids) < 1500
    assert out.metrics.e2e_latency is not None
    assert time.monotonic() - t0 < 30
    assert_idle(engine)


def test_abort_unknown_id_is_harmless(engine: Any) -> None:
    engine.abort("no-such-request")
    out = engine.generate(greedy(n=2))
    assert out.finish_reason == "length"


def test_cancelling_generate_async_aborts(engine: Any) -> None:
    async def main() -> None:
        task = asyncio.create_task(engine.generate_async(greedy(n=1500, request_id="to-cancel")))
        await asyncio.sleep(0.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # keep this event loop open until the engine has ended the request (see the closed-loop tests below)
        while engine.scheduler.has_unfinished() or engine._pending:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)

    asyncio.run(asyncio.wait_for(main(), 30))
    assert_idle(engine)


def test_breaking_out_of_an_async_stream_aborts_the_request(engine: Any) -> None:
    async def main() -> int:
        seen = 0
        async for _delta in engine.generate_stream(greedy(n=1500)):
            seen += 1
            if seen == 3:
                break
        # asyncio closes the dropped async generator in a task, which sends the abort; keep the
        # loop open until the engine has ended the request (see the closed-loop tests below)
        while engine.scheduler.has_unfinished() or engine._pending:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        return seen

    assert asyncio.run(asyncio.wait_for(main(), 30)) == 3
    assert_idle(engine)


@pytest.fixture
def private_engine() -> Any:
    """A fresh engine for tests that may kill it (started per test, ~1-3 s)."""
    eng = start_engine({"kv_cache": {"num_blocks": 128}})
    yield eng
    if eng._thread is not None and eng._thread.is_alive():
        eng.shutdown()


def _assert_still_serves(eng: Any) -> None:
    assert wait_until(lambda: not eng.scheduler.has_unfinished() or not eng._thread.is_alive(), 10)
    time.sleep(0.3)  # let the engine thread deliver the aborted request's output
    assert eng._thread.is_alive(), "the engine thread died"
    out = run_with_timeout(lambda: eng.generate(greedy(n=2)), 30)
    assert out.finish_reason == "length"


# A caller that abandons an async request and closes its event loop before the engine ends the
# request once killed the engine thread (call_soon_threadsafe on a closed loop); every later request
# then hung. These guard the fix.


def test_wait_for_timeout_on_generate_async_does_not_kill_the_engine(private_engine: Any) -> None:
    async def main() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(private_engine.generate_async(greedy(n=1500)), 0.5)

    asyncio.run(main())  # the loop closes right after the timeout, as in any short-lived script
    _assert_still_serves(private_engine)


def test_breaking_an_async_stream_then_closing_the_loop_does_not_kill_the_engine(private_engine: Any) -> None:
    async def main() -> None:
        async for _delta in private_engine.generate_stream(greedy(n=1500)):
            break

    asyncio.run(main())
    _assert_still_serves(private_engine)


# ---- ids, stats ----------------------------------------------------------------------------


def test_duplicate_request_id_in_one_batch_raises(engine: Any) -> None:
    finished0 = engine.get_stats()["finished"]
    with pytest.raises(ValueError, match="dup"):
        engine.generate_batch([greedy(n=2, request_id="dup"), greedy(n=2), greedy(n=2, request_id="dup")])
    time.sleep(0.1)
    assert engine.get_stats()["finished"] == finished0, "nothing may be queued"
    assert_idle(engine)


def test_duplicate_of_an_in_flight_request_gets_an_error_output(engine: Any) -> None:
    async def main() -> tuple[GenerateOutput, GenerateOutput]:
        first = asyncio.create_task(engine.generate_async(greedy(n=20, request_id="busy")))
        await asyncio.sleep(0.2)
        second = await asyncio.wait_for(engine.generate_async(greedy(n=3, request_id="busy")), 10)
        return await asyncio.wait_for(first, 30), second

    first, second = asyncio.run(main())
    assert second.finish_reason == "error" and "busy" in second.error
    assert first.finish_reason == "length" and len(first.token_ids) == 20
    assert_idle(engine)


def test_get_stats_has_kv_fields(engine: Any) -> None:
    s = engine.get_stats()
    for key in ("kv_block_size", "kv_num_blocks", "kv_capacity_tokens", "kv_free_blocks", "kv_usage",
                "kv_cache_bytes", "num_preemptions", "steps", "output_tokens", "prompt_tokens",
                "max_model_len"):
        assert key in s, key
    assert s["kv_block_size"] == 16 and s["kv_num_blocks"] == 512
    assert s["kv_capacity_tokens"] == 16 * 512
    assert s["kv_usage"] == 0.0 and s["kv_free_blocks"] == 512
    shape = engine.shape
    assert s["kv_cache_bytes"] == 2 * shape.num_layers * shape.num_kv_heads * 512 * 16 * shape.head_dim * 4
    assert s["dtype"] == "float32" and s["max_model_len"] == 2048

    # while a request runs, its blocks are in use
    seen = []

    def on_delta() -> None:
        for _ in engine.generate_stream(greedy(n=6)):
            seen.append(engine.get_stats()["kv_usage"])

    run_with_timeout(on_delta, 30)
    assert max(seen) > 0
    assert_idle(engine)


def test_shutdown_aborts_in_flight_requests_then_generate_raises() -> None:
    eng = start_engine({"kv_cache": {"num_blocks": 128}})
    assert eng.generate(greedy(n=2)).finish_reason == "length"
    result: list[GenerateOutput] = []
    caller = threading.Thread(target=lambda: result.append(eng.generate(greedy(n=1500))), daemon=True)
    caller.start()
    assert wait_until(lambda: eng.get_stats()["output_tokens"] > 2, 20)
    run_with_timeout(eng.shutdown, 20)
    caller.join(10)
    assert result and result[0].finish_reason == "abort"
    assert 0 < len(result[0].token_ids) < 1500
    with pytest.raises(RuntimeError, match="initialize"):
        eng.generate(greedy(n=2))
    eng.shutdown()  # idempotent


# ---- other dtypes --------------------------------------------------------------------------


def test_bfloat16_engine_generates_sensible_text() -> None:
    eng = start_engine({"model": {"dtype": "bfloat16"}, "kv_cache": {"num_blocks": 32}})
    try:
        assert eng.get_stats()["dtype"] == "bfloat16"
        assert eng.kv_cache.tensor.dtype.is_floating_point and eng.kv_cache.tensor.element_size() == 2
        out = run_with_timeout(
            lambda: eng.generate(GenerateRequest(messages=CHAT, max_new_tokens=16, temperature=0.0)), 120
        )
        assert out.error is None and out.finish_reason in ("stop", "length")
        assert out.text.strip()
        assert "Paris" in out.text, out.text
    finally:
        eng.shutdown()
