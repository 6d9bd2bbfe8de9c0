"""Bad input gets a clear error, never a crash or a hang.

Every blocking call runs under a timeout guard (`run_with_timeout`, subprocess timeouts), and after
each bad request the same engine must still serve a good one. Cases where the engine currently
misbehaved when these tests were written has a test of the fixed behaviour.
"""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import run_with_timeout, start_engine

from sagellm.config import ConfigError, SageLLMConfig
from sagellm.engine import GenerateRequest
from sagellm.models.errors import ModelLoadError
from sagellm.models.paths import default_model_path

MAX_LEN = 64


@pytest.fixture(scope="module")
def small_engine() -> Iterator[Any]:
    """A float32 engine with a 64-token context window (KV pool 8 x 16 = 128 slots)."""
    eng = start_engine({"model": {"dtype": "float32", "max_model_len": MAX_LEN},
                        "kv_cache": {"num_blocks": 8, "block_size": 16}})
    yield eng
    eng.shutdown()


def good(prompt: str = "Hello, my name is", n: int = 2, **kw: Any) -> GenerateRequest:
    return GenerateRequest(prompt=prompt, max_new_tokens=n, temperature=0.0, ignore_eos=True, **kw)


def assert_serves(eng: Any) -> None:
    """The engine still answers a good request, and nothing is left behind in it."""
    out = run_with_timeout(lambda: eng.generate(good()), 30)
    assert out.finish_reason == "length" and len(out.token_ids) == 2 and out.error is None
    assert not eng.scheduler.has_unfinished()
    assert eng.get_stats()["kv_free_blocks"] == eng.get_stats()["kv_num_blocks"]


def tokens_prompt(eng: Any, n: int) -> tuple[int, ...]:
    """A prompt of exactly `n` token ids (real text tokens)."""
    ids = eng.tokenizer.encode("the quick brown fox jumps over the lazy dog " * (n // 5 + 2))
    return tuple(ids[:n])


# ---- bad requests: ValueError in the caller, engine unharmed ---------------------------------

BAD_REQUESTS: list[tuple[str, Callable[[Any], Any], str]] = [
    ("empty_prompt", lambda e: e.generate(GenerateRequest(prompt="")), "prompt"),
    ("empty_prompt_string", lambda e: e.generate(""), "prompt"),
    ("empty_prompt_stream", lambda e: e.generate_stream(""), "prompt"),
    ("empty_prompt_batch", lambda e: e.generate_batch([good(), ""]), "prompt"),
    ("empty_token_ids", lambda e: e.generate(GenerateRequest(prompt_token_ids=())), "prompt_token_ids"),
    ("negative_token_id", lambda e: e.generate(GenerateRequest(prompt_token_ids=(1, -5))),
     "prompt_token_ids"),
    ("token_id_outside_vocab", lambda e: e.generate(GenerateRequest(prompt_token_ids=(1, 10**6))),
     "vocabulary"),
    ("empty_messages", lambda e: e.generate(GenerateRequest(messages=())), "messages"),
    ("no_input", lambda e: e.generate(GenerateRequest()), "exactly one"),
    ("two_inputs", lambda e: e.generate(GenerateRequest(prompt="a", prompt_token_ids=(1,))), "exactly one"),
    ("max_new_tokens_0", lambda e: e.generate("Hi", max_new_tokens=0), "max_new_tokens"),
    ("max_new_tokens_negative", lambda e: e.generate("Hi", max_new_tokens=-3), "max_new_tokens"),
    ("max_new_tokens_float", lambda e: e.generate("Hi", max_new_tokens=2.5), "max_new_tokens"),
    ("temperature_negative", lambda e: e.generate("Hi", temperature=-0.5), "temperature"),
    ("temperature_string", lambda e: e.generate("Hi", temperature="hot"), "temperature"),
    ("top_p_0", lambda e: e.generate("Hi", top_p=0.0), "top_p"),
    ("top_p_1.5", lambda e: e.generate("Hi", top_p=1.5), "top_p"),
    ("top_p_nan", lambda e: e.generate("Hi", top_p=math.nan), "top_p"),
    ("top_k_negative", lambda e: e.generate("Hi", top_k=-1), "top_k"),
    ("stop_empty_string", lambda e: e.generate("Hi", stop=("",)), "stop"),
    ("stop_token_negative", lambda e: e.generate("Hi", stop_token_ids=(-1,)), "stop_token_ids"),
    ("seed_string", lambda e: e.generate("Hi", seed="abc"), "seed"),
    ("empty_request_id", lambda e: e.generate(GenerateRequest(prompt="Hi", request_id="")), "request_id"),
    ("not_a_request", lambda e: e.generate(42), "GenerateRequest"),
    ("options_with_request", lambda e: e.generate(GenerateRequest(prompt="Hi"), max_new_tokens=3), "keyword"),
    ("async_bad", lambda e: asyncio.run(e.generate_async("Hi", top_p=2.0)), "top_p"),
]


@pytest.mark.parametrize("case, call, match", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_raises_value_error(small_engine: Any, case: str, call: Callable[[Any], Any],
                                        match: str) -> None:
    finished0 = small_engine.get_stats()["finished"]
    with pytest.raises(ValueError, match=match):
        run_with_timeout(lambda: call(small_engine), 30)
    assert small_engine.get_stats()["finished"] == finished0, "a rejected request must not be queued"
    assert_serves(small_engine)


def test_prompt_longer_than_context_window(small_engine: Any) -> None:
    ids = tokens_prompt(small_engine, 100)
    assert len(ids) == 100
    with pytest.raises(ValueError, match=r"context window.*max_model_len 64"):
        run_with_timeout(lambda: small_engine.generate(GenerateRequest(prompt_token_ids=ids)), 30)
    text = small_engine.tokenizer.decode(ids)
    with pytest.raises(ValueError, match="context window"):
        run_with_timeout(lambda: small_engine.generate(text), 30)
    # exactly the window leaves no room for a new token
    with pytest.raises(ValueError, match="context window"):
        run_with_timeout(lambda: small_engine.generate(GenerateRequest(prompt_token_ids=ids[:MAX_LEN])), 30)
    assert_serves(small_engine)


def test_generation_stops_at_the_context_window(small_engine: Any) -> None:
    one_left = run_with_timeout(lambda: small_engine.generate(
        GenerateRequest(prompt_token_ids=tokens_prompt(small_engine, MAX_LEN - 1), max_new_tokens=50,
                        temperature=0.0, ignore_eos=True)), 30)
    assert one_left.finish_reason == "length" and len(one_left.token_ids) == 1
    capped = run_with_timeout(lambda: small_engine.generate(
        GenerateRequest(prompt_token_ids=tokens_prompt(small_engine, 10), max_new_tokens=1000,
                        temperature=0.0, ignore_eos=True)), 60)
    assert capped.finish_reason == "length" and len(capped.token_ids) == MAX_LEN - 10
    assert_serves(small_engine)


def test_prompt_longer_than_the_kv_pool(small_kv_engine: Any) -> None:
    """The KV pool (640 slots) is smaller than the configured context window (2048): the engine caps
    its context window at the pool's capacity, so a 700-token prompt is rejected in the caller."""
    eng = small_kv_engine
    assert eng.config.model.max_model_len > 700 > eng.get_stats()["kv_capacity_tokens"]
    assert eng.max_model_len == eng.get_stats()["kv_capacity_tokens"]
    ids = tokens_prompt(eng, 700)
    with pytest.raises(ValueError, match="context window"):
        run_with_timeout(lambda: eng.generate(GenerateRequest(prompt_token_ids=ids, max_new_tokens=4)), 30)
    assert_serves(eng)


def test_bad_request_in_a_batch_queues_nothing(small_engine: Any) -> None:
    finished0 = small_engine.get_stats()["finished"]
    # the last request fails only in the engine's own checks, after the others were prepared
    bad = GenerateRequest(prompt_token_ids=(1, 10**6))
    with pytest.raises(ValueError, match="vocabulary"):
        run_with_timeout(lambda: small_engine.generate_batch([good(), good(n=3), bad]), 30)
    assert small_engine.get_stats()["finished"] == finished0
    assert_serves(small_engine)


def test_whitespace_prompt_is_a_valid_prompt(small_engine: Any) -> None:
    out = run_with_timeout(lambda: small_engine.generate(good(" ")), 30)
    assert out.finish_reason == "length" and len(out.prompt_token_ids) >= 1


# ---- engine bugs found by these tests, now fixed ---------------------------------------------


def test_nan_temperature_is_rejected(small_engine: Any) -> None:
    try:
        with pytest.raises(ValueError, match="temperature"):
            run_with_timeout(lambda: small_engine.generate("Hi", max_new_tokens=2, temperature=math.nan), 30)
    finally:
        assert_serves(small_engine)


def test_a_failing_request_does_not_take_its_batch_down(small_engine: Any) -> None:
    alone = run_with_timeout(lambda: small_engine.generate(good(n=6)), 30)
    outs = run_with_timeout(lambda: small_engine.generate_batch(
        [good(n=6), GenerateRequest(prompt="Hi", max_new_tokens=6, temperature=1e-40)]), 30)
    assert_serves(small_engine)
    assert outs[0].finish_reason == "length", outs[0].error
    assert outs[0].token_ids == alone.token_ids


def test_out_of_range_seed_is_rejected() -> None:
    with pytest.raises(ValueError, match="seed"):
        GenerateRequest(prompt="Hi", temperature=0.8, seed=2**70)


@pytest.mark.parametrize("messages", [({"role": "user"},), ("hello",), ({"content": "hi"},)],
                         ids=["no_content", "not_a_dict", "no_role"])
def test_malformed_messages_raise_value_error(small_engine: Any, messages: tuple) -> None:
    try:
        with pytest.raises(ValueError, match="messages"):
            run_with_timeout(
                lambda: small_engine.generate(GenerateRequest(messages=messages, max_new_tokens=2)), 30
            )
    finally:
        assert_serves(small_engine)


# ---- model files -----------------------------------------------------------------------------


def _init_fails(model_id: str) -> ModelLoadError:
    from sagellm.engine import SageLLMEngine

    eng = SageLLMEngine(SageLLMConfig.from_dict({"model": {"model_id": model_id}}))
    with pytest.raises(ModelLoadError) as info:
        run_with_timeout(eng.initialize, 60)
    assert str(model_id) in str(info.value), str(info.value)
    # the engine did not start: requests are refused, not queued forever
    with pytest.raises(RuntimeError, match="initialize"):
        eng.generate("Hi")
    return info.value


def test_unknown_model_path() -> None:
    err = _init_fails("/nonexistent/x.gguf")
    assert "no such file" in str(err)
    assert isinstance(err, ValueError)


def test_truncated_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "truncated.gguf"
    with open(default_model_path(), "rb") as f:
        bad.write_bytes(f.read(1 << 20))
    _init_fails(str(bad))


def test_random_bytes_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "random.gguf"
    bad.write_bytes(os.urandom(1 << 16))
    _init_fails(str(bad))


def test_empty_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "empty.gguf"
    bad.write_bytes(b"")
    _init_fails(str(bad))


def test_not_a_gguf_name_or_model_dir(tmp_path: Path) -> None:
    wrong = tmp_path / "model.bin"
    wrong.write_bytes(b"\0" * 100)
    assert "GGUF" in str(_init_fails(str(wrong)))
    assert "config.json" in str(_init_fails(str(tmp_path)))


# ---- configuration files -----------------------------------------------------------------------

BAD_YAML = [
    ("model:\n  dtyp: float32\n", "model.dtyp"),
    ("modle:\n  dtype: float32\n", "modle"),
    ("scheduler:\n  max_num_seqs: many\n", "scheduler.max_num_seqs"),
    ("scheduler:\n  max_num_seqs: true\n", "scheduler.max_num_seqs"),
    ("scheduler:\n  max_num_seqs: 0\n", "scheduler.max_num_seqs"),
    ("scheduler:\n  chunked_prefill: maybe\n", "scheduler.chunked_prefill"),
    ("model:\n  dtype: float64\n", "model.dtype"),
    ("model:\n  max_model_len: -1\n", "model.max_model_len"),
    ("model: float32\n", "model"),
    ("kv_cache:\n  block_size: 0\n", "kv_cache.block_size"),
    ("kv_cache:\n  memory_gb: 1GB\n", "kv_cache.memory_gb"),
    ("backend:\n  device: tpu\n", "backend.device"),
    ("- model\n- dtype\n", "mapping"),
    ("model: {dtype: float32\n", "YAML"),
]


@pytest.mark.parametrize("text, names", BAD_YAML, ids=[m for _, m in BAD_YAML])
def test_bad_yaml_config(tmp_path: Path, text: str, names: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        SageLLMConfig.from_yaml(path)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        SageLLMConfig.from_yaml(tmp_path / "nope.yaml")


def test_unknown_key_message_lists_allowed_keys() -> None:
    with pytest.raises(ConfigError) as info:
        SageLLMConfig.from_dict({"model": {"dtyp": "float32"}})
    msg = str(info.value)
    assert msg.startswith("model.dtyp") and "dtype" in msg and "max_model_len" in msg


# ---- command line ------------------------------------------------------------------------------


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "sagellm.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def assert_clean_failure(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode != 0, res
    assert "Traceback" not in res.stderr, res.stderr
    for needle in needles:
        assert needle in res.stderr, res.stderr


def test_cli_empty_raw_prompt() -> None:
    res = run_cli("generate", "--raw", "")
    assert_clean_failure(res, "prompt")
    assert res.returncode == 2


def test_cli_empty_chat_prompt() -> None:
    res = run_cli("generate", "", "--max-new-tokens", "2", "--quiet")
    assert_clean_failure(res, "prompt")


def test_cli_unknown_model() -> None:
    assert_clean_failure(run_cli("generate", "Hi", "--model", "/nonexistent/x.gguf"), "/nonexistent/x.gguf")


def test_cli_bad_config_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  dtyp: float32\n")
    assert_clean_failure(run_cli("generate", "Hi", "--config", str(path)), "model.dtyp")


def test_cli_bad_sampling_option() -> None:
    assert_clean_failure(run_cli("generate", "Hi", "--max-new-tokens", "0"), "max_new_tokens")


def test_cli_bad_choice_and_command() -> None:
    assert_clean_failure(run_cli("info", "--dtype", "float64"), "invalid choice")
    assert_clean_failure(run_cli("frobnicate"), "invalid choice")
