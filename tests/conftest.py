"""Shared fixtures for the engine tests: session-scoped engines and the transformers reference model.

Engines are expensive (~3-5 s each to start, ~0.5 GB of float32 weights) and the transformers
reference model takes ~20-40 s to load, so each is built at most once per session and only when a
test asks for it. Tests that use a shared engine must not leave requests behind and must compare
`get_stats()` counters as differences (other tests use the same engine).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub

import pytest

from sagellm.config import SageLLMConfig

# The default engine: the bundled SmolLM2-135M-Instruct in float32 with 512 x 16 = 8192 KV slots,
# enough for 16 requests of ~200 prompt tokens plus their outputs without preemption.
DEFAULT_ENGINE_CONFIG = {"model": {"dtype": "float32"}, "kv_cache": {"num_blocks": 512, "block_size": 16}}

# A KV pool far too small for 16 concurrent requests (40 x 16 = 640 slots) but big enough for any
# single request of the tests: running 16 requests at once forces preemption by recompute.
SMALL_KV_ENGINE_CONFIG = {"model": {"dtype": "float32"}, "kv_cache": {"num_blocks": 40, "block_size": 16}}


def start_engine(config: dict[str, Any] | SageLLMConfig):
    from sagellm.engine import SageLLMEngine

    cfg = config if isinstance(config, SageLLMConfig) else SageLLMConfig.from_dict(config)
    return SageLLMEngine(cfg).initialize()


@pytest.fixture(scope="session")
def engine() -> Iterator[Any]:
    """The shared default float32 engine (started once per session)."""
    eng = start_engine(DEFAULT_ENGINE_CONFIG)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="session")
def small_kv_engine() -> Iterator[Any]:
    """A float32 engine whose KV pool (640 token slots) forces preemption under a 16-request batch."""
    eng = start_engine(SMALL_KV_ENGINE_CONFIG)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="session")
def hf_model() -> Any:
    """transformers' LlamaForCausalLM on the same GGUF file, dequantized to float32, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    from sagellm.models.paths import default_model_path

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.eval()
    return model


def run_with_timeout(fn: Callable[[], Any], timeout: float = 60.0) -> Any:
    """Run `fn()` in a daemon thread; return its result or re-raise its exception.

    Fails the test (instead of hanging the session) when `fn` has not returned after `timeout` s.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    t = threading.Thread(target=target, name="test-guard", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        pytest.fail(f"call did not return within {timeout} s (hang)")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Poll `predicate` until it is true or `timeout` s pass; returns its last value."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


ALONE_NEW_TOKENS = 32


@pytest.fixture(scope="session")
def greedy_alone(engine: Any) -> Callable[[dict[str, Any]], Any]:
    """fields -> GenerateOutput of that prompt run alone (nothing else in flight) on the default
    engine: greedy, ignore_eos, exactly ALONE_NEW_TOKENS new tokens. Memoised for the session, so the
    reference and batching tests share the expensive one-by-one runs. Greedy outputs are
    prefix-stable: the first k of these tokens are what max_new_tokens=k would give."""
    from prompts import prompt_key

    from sagellm.engine import GenerateRequest

    cache: dict[str, Any] = {}

    def get(fields: dict[str, Any]) -> Any:
        key = prompt_key(fields)
        if key not in cache:
            assert not engine.scheduler.has_unfinished(), "greedy_alone needs an idle engine"
            out = engine.generate(
                GenerateRequest(**fields, max_new_tokens=ALONE_NEW_TOKENS, temperature=0.0, ignore_eos=True)
            )
            assert out.finish_reason == "length" and len(out.token_ids) == ALONE_NEW_TOKENS, out
            cache[key] = out
        return cache[key]

    return get


@pytest.fixture(autouse=True)
def _shared_engines_alive(request: pytest.FixtureRequest) -> None:
    """Fail fast instead of hanging when an earlier test killed a shared engine's thread: requests
    submitted to a dead engine are queued and never answered."""
    for name in ("engine", "small_kv_engine"):
        if name in request.fixturenames:
            eng = request.getfixturevalue(name)
            if eng._thread is None or not eng._thread.is_alive():
                pytest.fail(f"the shared {name!r} engine's thread is dead (killed by an earlier test)")
