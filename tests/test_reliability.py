"""Defects a hostile or careless user found, each as a test that failed before its fix.

Weight-cache corruption, a cancelled duplicate aborting someone else's request, YAML alias bombs,
unbounded simulator workloads, KV sizes that cannot fit, the minor request and file cases, Ctrl-C in
an experiment run, and callers racing `shutdown()` or a crashed loop. docs/reliability.md lists what
each guarantees.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import run_with_timeout, start_engine
from test_model_loading import random_weights, tiny_shape, write_gguf

from sagellm.config import ConfigError, SageLLMConfig
from sagellm.engine import GenerateRequest, SageLLMEngine
from sagellm.errors import InputError, RequestError
from sagellm.models import weight_cache
from sagellm.models.loader import load_model_weights

# ---- 1. a corrupted weight cache is detected and rebuilt ----------------------------------------


@pytest.fixture()
def cached_tiny_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny GGUF model loaded once, so that its float32 weights are in a fresh cache dir."""
    monkeypatch.setenv("SAGELLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SAGELLM_NO_CACHE", raising=False)
    shape = tiny_shape()
    path = write_gguf(tmp_path / "tiny.gguf", "llama", shape, random_weights(shape))
    _, weights = load_model_weights(path, torch.float32)
    assert weight_cache.load_cached(path, torch.float32) is not None
    return path, weights


def _cached_weights_file(path: Path) -> Path:
    return weight_cache._entry(path) / "weights.safetensors"


def _assert_rebuilt(path: Path, want: dict[str, torch.Tensor], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="sagellm.models.weight_cache"):
        _, got = load_model_weights(path, torch.float32)
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[n], want[n]) for n in want), "a damaged cache entry changed the weights"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "damaged" in warnings[0] and "rebuilding" in warnings[0], warnings
    # the rebuilt entry is whole again and served without a warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sagellm.models.weight_cache"):
        assert weight_cache.load_cached(path, torch.float32) is not None
    assert not caplog.records


def test_flipped_bytes_in_the_weight_cache_are_detected(cached_tiny_model: Any,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    path, want = cached_tiny_model
    file = _cached_weights_file(path)
    data = bytearray(file.read_bytes())
    for offset in range(len(data) - 4000, len(data) - 3000, 97):  # inside the tensor data
        data[offset] ^= 0x5A
    file.write_bytes(bytes(data))
    _assert_rebuilt(path, want, caplog)


def test_truncated_weight_cache_is_rebuilt(cached_tiny_model: Any, caplog: pytest.LogCaptureFixture) -> None:
    path, want = cached_tiny_model
    file = _cached_weights_file(path)
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    _assert_rebuilt(path, want, caplog)


def test_damaged_cache_metadata_is_rebuilt(cached_tiny_model: Any, caplog: pytest.LogCaptureFixture) -> None:
    path, want = cached_tiny_model
    (weight_cache._entry(path) / "shape.json").write_text('{"vocab_size": "many"}')
    _assert_rebuilt(path, want, caplog)


# ---- 2. cancelling a rejected duplicate leaves the first caller's request alone ----------------


@pytest.fixture(scope="module")
def tiny_engine() -> Any:
    eng = start_engine({"model": {"dtype": "float32", "max_model_len": 256},
                        "kv_cache": {"num_blocks": 48, "block_size": 16}})
    yield eng
    eng.shutdown()


def test_cancelling_a_rejected_duplicate_does_not_abort_the_original(tiny_engine: Any) -> None:
    request = GenerateRequest(prompt="Once upon a time", request_id="dup", max_new_tokens=40, temperature=0.0,
                              ignore_eos=True)

    async def scenario() -> Any:
        first = asyncio.create_task(tiny_engine.generate_async(request))
        await asyncio.sleep(0.3)  # the first request is in flight
        second = asyncio.create_task(tiny_engine.generate_async(request))
        await asyncio.sleep(0)  # submitted, now waiting for its (rejection) output
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        return await first

    out = run_with_timeout(lambda: asyncio.run(scenario()), 120)
    assert out.finish_reason == "length" and len(out.token_ids) == 40, (out.finish_reason, out.error)


def test_cancelling_a_caller_still_aborts_its_own_request(tiny_engine: Any) -> None:
    async def scenario() -> None:
        task = asyncio.create_task(tiny_engine.generate_async(
            GenerateRequest(prompt="Hello", request_id="mine", max_new_tokens=200, ignore_eos=True)))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run_with_timeout(lambda: asyncio.run(scenario()), 60)
    assert run_with_timeout(lambda: _wait_idle(tiny_engine), 30)


def _wait_idle(eng: Any) -> bool:
    import time

    while eng.scheduler.has_unfinished():
        time.sleep(0.02)
    return eng.get_stats()["kv_free_blocks"] == eng.get_stats()["kv_num_blocks"]


# ---- 3. YAML alias bombs, deep nesting, binary files ----------------------------------------------


def alias_bomb(field_path: list[str], levels: int = 10) -> str:
    """A 'billion laughs' document: `levels` anchors, each a list of ten aliases of the previous one
    (10**levels strings once expanded), the last one placed under the nested keys `field_path`."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    lines += [f"{'  ' * depth}{key}:" for depth, key in enumerate(field_path)]
    lines[-1] += f" *a{levels - 1}"
    return "\n".join(lines) + "\n"


def _loaders() -> dict[str, Any]:
    from experiments.config import ExperimentConfig
    from simulator.config import SimulationConfig

    return {"config": SageLLMConfig.from_yaml, "simulation": SimulationConfig.from_yaml,
            "experiment": ExperimentConfig.from_yaml}


@pytest.mark.parametrize("kind, field_path", [("config", ["model", "model_id"]),
                                              ("simulation", ["workload", "arrival"]),
                                              ("experiment", ["name"])])
def test_yaml_alias_bomb_is_refused(tmp_path: Path, kind: str, field_path: list[str]) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb(field_path))
    with pytest.raises(ConfigError, match="alias"):
        run_with_timeout(lambda: _loaders()[kind](path), 30)


def test_alias_bomb_text_is_what_it_claims(tmp_path: Path) -> None:
    import yaml

    small = yaml.safe_load(alias_bomb(["model", "model_id"], levels=3))["model"]["model_id"]
    assert len(small) == len(small[0]) == len(small[0][0]) == 10 and small[0][0][0] == "lol"


@pytest.mark.parametrize("name, content, match", [
    ("deep", "model: " + "[" * 3000 + "]" * 3000 + "\n", "nests too deeply"),
    ("recursive", "model: &a [*a]\n", "recursive"),
    ("binary", bytes(range(256)), "not UTF-8"),
    ("huge_int", "model:\n  max_model_len: " + "9" * 5000 + "\n", "cannot be read"),
])
def test_hostile_yaml_files_get_a_clear_error(tmp_path: Path, name: str, content: str | bytes, match: str) -> None:
    path = tmp_path / f"{name}.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    for load in _loaders().values():
        with pytest.raises(ConfigError, match=match):
            run_with_timeout(lambda load=load: load(path), 30)


def test_a_big_value_in_an_error_message_is_cut(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        SageLLMConfig.from_dict({"model": {"model_id": [["x" * 1000] * 1000] * 1000}})
    assert str(info.value).startswith("model.model_id") and len(str(info.value)) < 300


# ---- 4. simulator workloads are bounded before anything is built ----------------------------------


def _simulation(workload: dict[str, Any], **extra: Any) -> Any:
    from simulator.config import SimulationConfig

    return SimulationConfig.from_dict({"model": "smollm2-135m", "hardware": "a100-80gb-sxm",
                                       "workload": workload, **extra})


def test_too_many_requests_is_refused_up_front() -> None:
    spec = {"num_requests": 10_000_000, "arrival": {"kind": "poisson", "rate": 1e9}, "prompt_len": 8,
            "output_len": 8}
    with pytest.raises(ConfigError, match=r"workload\.num_requests: must be <= 2000000"):
        run_with_timeout(lambda: _simulation(spec), 30)
    with pytest.raises(ConfigError, match=r"workload\.duration"):
        _simulation({**spec, "num_requests": None, "duration": 3600.0})


@pytest.mark.parametrize("length, match", [
    ({"kind": "lognormal", "median": 100, "sigma": 50}, r"prompt_len\.sigma: must be <= 10"),
    ({"kind": "lognormal", "median": 100, "sigma": 1, "max": 10**9}, r"prompt_len\.max: must be <= 16777216"),
    ({"kind": "fixed", "value": 10**12}, r"prompt_len\.value"),
    ({"kind": "uniform", "low": 1, "high": 10**12}, r"prompt_len\.high"),
])
def test_absurd_lengths_are_refused(length: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _simulation({"num_requests": 10, "arrival": {"kind": "poisson", "rate": 1.0}, "prompt_len": length,
                     "output_len": 8})


def test_prompts_beyond_the_context_window_are_refused_before_their_ids_are_made(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import simulator.sim as sim_module
    from simulator.sim import Simulation

    made: list[int] = []
    real = sim_module.prompt_token_ids
    monkeypatch.setattr(sim_module, "prompt_token_ids",
                        lambda tr, *a, **k: made.append(tr.prompt_len) or real(tr, *a, **k))
    cfg = _simulation({"num_requests": 200, "arrival": {"kind": "poisson", "rate": 50.0},
                       "prompt_len": {"kind": "lognormal", "median": 1500, "sigma": 3, "max": 16_000_000},
                       "output_len": 4}, sagellm={"model": {"max_model_len": 2048}})
    result = run_with_timeout(lambda: Simulation(cfg).run(), 120)
    assert result.summary["num_rejected"] > 20
    assert made and max(made) < 2048, "token ids were built for a prompt the scheduler refuses"
    rejected = [r for r in result.records if r.finish_reason == "error"]
    assert len(rejected) == result.summary["num_rejected"] and all(r.num_prompt_tokens >= 2048 for r in rejected)
    assert all(r.finish_time is not None and r.num_output_tokens == 0 for r in rejected)


def test_a_queue_growing_without_bound_stops_the_simulation(monkeypatch: pytest.MonkeyPatch) -> None:
    import simulator.sim as sim_module
    from simulator.sim import Simulation

    monkeypatch.setattr(sim_module, "MAX_OUTSTANDING_TOKENS", 200_000)
    cfg = _simulation({"num_requests": 20_000, "arrival": {"kind": "poisson", "rate": 1e9}, "prompt_len": 100,
                       "output_len": 100})
    with pytest.raises(ConfigError, match=r"workload: after \d+ arrivals.*prompt tokens are queued"):
        run_with_timeout(lambda: Simulation(cfg).run(), 120)


# ---- 5. KV sizes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kv, match", [
    ({"memory_gb": float("inf")}, r"kv_cache\.memory_gb: .*finite number"),
    ({"memory_gb": float("nan")}, r"kv_cache\.memory_gb"),
    ({"ddr_memory_gb": float("inf")}, r"kv_cache\.ddr_memory_gb: .*finite number"),
    ({"block_size": 1_000_000}, r"kv_cache\.block_size: must be in \[1, 1024\]"),
    ({"num_blocks": 2**40}, r"kv_cache\.num_blocks: must be in"),
    ({"memory_gb": 1e9}, r"kv_cache\.memory_gb: .* blocks, more than"),
])
def test_kv_sizes_are_validated(kv: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        cfg = SageLLMConfig.from_dict({"kv_cache": kv})
        cfg.kv_cache.device_blocks(368_640)
        cfg.kv_cache.tier_blocks(368_640)


@pytest.mark.parametrize("kv, field", [({"num_blocks": 2**22}, "num_blocks"), ({"memory_gb": 4096.0}, "memory_gb"),
                                       ({"enable_prefix_caching": True, "ddr_memory_gb": 4096.0}, "ddr_memory_gb")])
def test_a_kv_pool_that_cannot_fit_is_refused_before_allocating(kv: dict[str, Any], field: str) -> None:
    eng = SageLLMEngine(SageLLMConfig.from_dict({"kv_cache": kv}))
    with pytest.raises(ConfigError, match=rf"kv_cache\.{field}: .*(does not fit|available)"):
        run_with_timeout(eng.initialize, 120)
    with pytest.raises(RuntimeError, match="initialize"):
        eng.generate("Hi")


def test_an_nvme_path_that_cannot_be_created_names_the_field(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    eng = SageLLMEngine(SageLLMConfig.from_dict({"kv_cache": {
        "num_blocks": 16, "enable_prefix_caching": True, "nvme_num_blocks": 8, "nvme_path": str(blocker / "kv")}}))
    with pytest.raises(ConfigError, match=r"kv_cache\.nvme_path: cannot create"):
        run_with_timeout(eng.initialize, 120)


# ---- 6. the minor cases ------------------------------------------------------------------------------


@pytest.mark.parametrize("fields, match", [
    ({"prompt_token_ids": (1, True, 3)}, "prompt_token_ids"),
    ({"prompt": "Hi", "stop_token_ids": (False,)}, "stop_token_ids"),
    ({"prompt": "Hi \ud800 there"}, r"prompt: not valid Unicode"),
    ({"messages": [{"role": "user", "content": "\udfff"}]}, r"messages\[0\]\.content"),
    ({"prompt": "Hi", "stop": ["\ud83d"]}, "stop"),
    ({"prompt": "Hi", "stop": 5}, "stop"),
    ({"prompt": "Hi", "top_k": True}, "top_k"),
    ({"prompt": "Hi", "tenant": 7}, "tenant"),
    ({"prompt_token_ids": 5}, "prompt_token_ids"),
    ({"messages": 5}, "messages"),
    ({"prompt": "Hi", "ignore_eos": "yes"}, "ignore_eos"),
])
def test_bad_request_fields_raise_request_error(fields: dict[str, Any], match: str) -> None:
    with pytest.raises(RequestError, match=match):
        GenerateRequest(**fields)


def test_stop_none_means_no_stop_strings(tiny_engine: Any) -> None:
    req = GenerateRequest(prompt="Hi", stop=None, stop_token_ids=None, max_new_tokens=3, temperature=0.0,
                          ignore_eos=True)
    assert req.stop == () and req.stop_token_ids == ()
    out = run_with_timeout(lambda: tiny_engine.generate(req), 60)
    assert out.finish_reason == "length" and len(out.token_ids) == 3


def test_ctrl_c_in_an_experiment_run_says_how_to_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    import experiments.runner as runner
    from sagellm.cli import main

    exp = tmp_path / "exp.yaml"
    exp.write_text("""name: interrupt-me
sides: [simulate]
model: smollm2-135m
hardware: a100-80gb-sxm
workload: {num_requests: 20, arrival: {kind: poisson, rate: 5.0}, prompt_len: 32, output_len: 8}
sweep: {workload.arrival.rate: [2.0, 4.0]}
""")
    real, calls = runner._run_point, []

    def interrupted_on_second_point(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "_run_point", interrupted_on_second_point)
    code = main(["experiment", "run", str(exp), "--results", str(tmp_path / "results"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err
    assert "1 of 2 points finished" in err and f"sagellm experiment run {exp} --resume " in err, err
    run_dir = err.split("--resume ")[1].strip()
    monkeypatch.setattr(runner, "_run_point", real)
    assert main(["experiment", "run", str(exp), "--resume", run_dir, "--quiet"]) == 0
    assert "done earlier, skipped" in capsys.readouterr().out


# ---- callers racing shutdown, and a loop that dies ---------------------------------------------------


def test_callers_racing_shutdown_never_wait_forever() -> None:
    eng = start_engine({"model": {"dtype": "float32", "max_model_len": 128},
                        "kv_cache": {"num_blocks": 32, "block_size": 16}})
    results: list[str] = []

    async def caller(k: int) -> None:
        for i in range(50):
            try:
                out = await eng.generate_async(GenerateRequest(prompt="Hi", max_new_tokens=2, request_id=f"{k}-{i}"))
                results.append(out.finish_reason)
            except RuntimeError as exc:
                results.append("refused" if "not running" in str(exc) else repr(exc))
                return

    threads = [threading.Thread(target=lambda k=k: asyncio.run(caller(k))) for k in range(4)]
    for t in threads:
        t.start()
    import time

    time.sleep(0.5)
    eng.shutdown()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a caller racing shutdown() is still waiting"
    assert set(results) <= {"length", "stop", "abort", "refused"} and "refused" in results, set(results)


def test_a_submission_racing_shutdown_is_answered_or_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worst interleaving, made deterministic: a caller passes the liveness check, then
    `shutdown()` runs to its end before the caller queues its request. The request must still get
    an output (or the call a RuntimeError), not wait forever in a queue nobody reads."""
    eng = start_engine({"model": {"dtype": "float32", "max_model_len": 128},
                        "kv_cache": {"num_blocks": 32, "block_size": 16}})
    thread = eng._thread
    check_alive = eng._check_alive

    def check_then_let_shutdown_finish() -> None:
        check_alive()
        threading.Thread(target=eng.shutdown, daemon=True).start()
        thread.join(timeout=3.0)  # returns at once if shutdown waits for this submission to be queued

    monkeypatch.setattr(eng, "_check_alive", check_then_let_shutdown_finish)

    async def call() -> Any:
        return await asyncio.wait_for(eng.generate_async("Hi", max_new_tokens=2), 30)

    try:
        out = run_with_timeout(lambda: asyncio.run(call()), 60)
        assert out.finish_reason in ("length", "stop", "abort"), out.error
    except RuntimeError as exc:
        assert "not running" in str(exc)
    finally:
        monkeypatch.undo()
        eng.shutdown()


def test_a_crashed_loop_answers_every_waiting_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    eng = start_engine({"model": {"dtype": "float32", "max_model_len": 128},
                        "kv_cache": {"num_blocks": 32, "block_size": 16}})
    try:
        def broken(now: float) -> Any:
            raise AssertionError("scheduler bug")

        monkeypatch.setattr(eng.scheduler, "schedule", broken)

        async def call() -> Any:
            return await asyncio.wait_for(eng.generate_async("Hi", max_new_tokens=2), 30)

        out = run_with_timeout(lambda: asyncio.run(call()), 60)
        assert out.finish_reason == "error" and "scheduler bug" in out.error
        with pytest.raises(RuntimeError):
            eng.generate("Hi")
    finally:
        eng.shutdown()


def test_every_input_error_is_a_value_error() -> None:
    from sagellm.models.errors import ModelLoadError
    from simulator.hardware.spec import HardwareError
    from simulator.workloads import WorkloadError

    for cls in (ConfigError, RequestError, ModelLoadError, HardwareError, WorkloadError):
        assert issubclass(cls, InputError) and issubclass(cls, ValueError)


class FinishHookFails:
    """A scheduling policy (first come, first served) whose `on_finish` hook raises."""

    keeps_arrival_order = False
    tracks_service = True

    def order(self, waiting, now):
        return list(waiting)

    def victim(self, running, now):
        return running[-1]

    def on_arrival(self, request, now):
        pass

    def on_service(self, request, prompt_tokens, output_tokens):
        pass

    def on_finish(self, request, now):
        raise RuntimeError("policy bug in on_finish")


def test_a_policy_hook_that_raises_ends_its_requests_with_an_error_and_the_engine_serves_on() -> None:
    eng = start_engine({"model": {"dtype": "float32", "max_model_len": 128},
                        "kv_cache": {"num_blocks": 32, "block_size": 16},
                        "scheduler": {"policy": "test_reliability:FinishHookFails"}})
    try:
        out = run_with_timeout(lambda: eng.generate("Hi", max_new_tokens=2), 60)
        assert out.finish_reason == "error" and "policy bug in on_finish" in out.error
        assert eng.kv_manager.num_free_blocks == 32  # its blocks were freed before the hook ran
        again = run_with_timeout(lambda: eng.generate("Hello", max_new_tokens=2), 60)
        assert again.finish_reason == "error"  # still answered: the loop lives on
    finally:
        eng.shutdown()
