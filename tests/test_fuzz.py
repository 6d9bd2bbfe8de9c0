"""Property-based fuzzing of every input boundary (hypothesis).

Requests (`GenerateRequest` and the engine's own checks), `SageLLMConfig.from_dict`, simulation and
experiment YAML files, workload specs (and the requests they generate) and trace files. The property
is the same everywhere: the call succeeds, or it raises the project's own `InputError` with a message
naming a field (or the file); it never raises anything else, never allocates more than
`MEMORY_LIMIT` bytes, and never runs longer than `TIME_LIMIT_S` (a hang guard, not a speed test).
Strategies mix valid values with hostile ones (NaN, inf, huge and negative numbers, booleans where
numbers go, lone surrogates, wrong types, unknown keys), so examples reach past the first check.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
import signal
import string
import tempfile
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sagellm.config import SageLLMConfig
from sagellm.errors import InputError, RequestError

MEMORY_LIMIT = 64 * 2**20
TIME_LIMIT_S = 20
# Examples per boundary in `make test`; set SAGELLM_FUZZ_EXAMPLES higher for a longer hunt.
EXAMPLES = int(os.environ.get("SAGELLM_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.filter_too_much])


class Hang(Exception):
    """An example ran past TIME_LIMIT_S."""


@contextlib.contextmanager
def bounded(seconds: int = TIME_LIMIT_S) -> Iterator[None]:
    """Fail the example if it runs past `seconds` or its Python allocations peak above MEMORY_LIMIT."""
    def alarm(signum: int, frame: Any) -> None:
        raise Hang(f"an example ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    tracemalloc.start()
    try:
        yield
        _, peak = tracemalloc.get_traced_memory()
        assert peak <= MEMORY_LIMIT, f"an example allocated {peak / 2**20:.0f} MiB"
    finally:
        tracemalloc.stop()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def check(call: Callable[[], Any], error: type[InputError], names: Callable[[str], bool]) -> Any:
    """Run `call` under `bounded()`; it returns, or raises `error` whose message satisfies `names`."""
    with bounded():
        try:
            return call()
        except error as exc:
            assert names(str(exc)), f"the message names no field: {exc}"
            assert len(str(exc)) < 2000, "an error message grew with its input"
            return exc


def field_named(fields: set[str]) -> Callable[[str], bool]:
    """The message starts with a dotted field path (maybe indexed) whose first part is one of `fields`,
    or with the unknown key it reports ('<key>: unknown key')."""
    def names(message: str) -> bool:
        head = re.match(r"[\w.\[\]]+", message)
        if head is None:
            return False
        first = head.group(0).split(".")[0].split("[")[0]
        return first in fields or message.startswith(f"{head.group(0)}: unknown key")
    return names


# ---- hostile values ----------------------------------------------------------------------------

hostile_text = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=40)
numbers = st.one_of(st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0, 1, -1, 2**31, 2**63, 10**12, 1e-300, 1e300]))
scalars = st.one_of(st.none(), st.booleans(), numbers, hostile_text)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(hostile_text, inner, max_size=3)),
                      max_leaves=8)


def small_or_hostile(valid: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(valid, valid, scalars, values)


# ---- requests ----------------------------------------------------------------------------------

REQUEST_FIELDS = {"prompt", "prompt_token_ids", "messages", "request_id", "max_new_tokens", "temperature", "top_p",
                  "top_k", "seed", "stop", "stop_token_ids", "ignore_eos", "tenant", "give"}
token_ids = st.lists(st.integers(min_value=0, max_value=60_000), min_size=0, max_size=20)
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]), "content": hostile_text})
request_fields = st.fixed_dictionaries({}, optional={
    "prompt": small_or_hostile(st.text(max_size=40)),
    "prompt_token_ids": small_or_hostile(token_ids),
    "messages": small_or_hostile(st.lists(message, max_size=3)),
    "request_id": small_or_hostile(st.text(min_size=1, max_size=10)),
    "max_new_tokens": small_or_hostile(st.integers(min_value=1, max_value=64)),
    "temperature": small_or_hostile(st.floats(min_value=0, max_value=2)),
    "top_p": small_or_hostile(st.floats(min_value=0.01, max_value=1)),
    "top_k": small_or_hostile(st.integers(min_value=0, max_value=100)),
    "seed": small_or_hostile(st.integers(min_value=0, max_value=2**40)),
    "stop": small_or_hostile(st.lists(st.text(min_size=1, max_size=5), max_size=3)),
    "stop_token_ids": small_or_hostile(token_ids),
    "ignore_eos": small_or_hostile(st.booleans()),
    "tenant": small_or_hostile(st.text(max_size=8)),
})


@FUZZ
@given(request_fields)
def test_generate_request_fields(fields: dict[str, Any]) -> None:
    from sagellm.engine import GenerateRequest

    check(lambda: GenerateRequest(**fields), RequestError, field_named(REQUEST_FIELDS))


@pytest.fixture(scope="module")
def fuzz_engine() -> Any:
    from conftest import start_engine

    eng = start_engine({"model": {"dtype": "float32", "max_model_len": 64},
                        "kv_cache": {"num_blocks": 8, "block_size": 16}})
    yield eng
    eng.shutdown()


@settings(FUZZ, max_examples=max(1, EXAMPLES * 2 // 3))
@given(fields=request_fields)
def test_engine_checks_of_a_request(fuzz_engine: Any, fields: dict[str, Any]) -> None:
    """A request that constructs goes through the engine's own checks (tokenizing, chat template,
    vocabulary, context window) with the same property; a few are served, and must finish."""
    from sagellm.engine import GenerateRequest

    try:
        req = GenerateRequest(**fields)
    except RequestError:
        return
    prepared = check(lambda: fuzz_engine._prepare(req), RequestError, field_named(REQUEST_FIELDS))
    if isinstance(prepared, tuple) and req.request_id.startswith("a"):
        out = fuzz_engine.generate(GenerateRequest(**{**fields, "max_new_tokens": 2}))
        assert out.finish_reason in ("length", "stop"), out.error


# ---- SageLLMConfig -------------------------------------------------------------------------------

SECTIONS = {
    "model": {"model_id": st.none(), "dtype": st.sampled_from(["float32", "bfloat16", "float16"]),
              "max_model_len": st.integers(min_value=1, max_value=10**6)},
    "kv_cache": {"block_size": st.integers(min_value=1, max_value=64), "num_blocks": st.integers(1, 10**5),
                 "memory_gb": st.floats(0.01, 64), "enable_prefix_caching": st.booleans(),
                 "tenant_isolation": st.booleans(), "granularity": st.sampled_from(["block", "request", "layer"]),
                 "ddr_num_blocks": st.integers(0, 10**5), "ddr_memory_gb": st.floats(0, 64),
                 "nvme_num_blocks": st.integers(0, 10**5), "nvme_memory_gb": st.floats(0, 64),
                 "eviction_policy": st.sampled_from(["lru", "lfu"]), "cold_timeout_s": st.floats(0.1, 100),
                 "hot_access_threshold": st.integers(1, 5), "max_promotions_per_step": st.integers(0, 16)},
    "scheduler": {"max_num_seqs": st.integers(1, 256), "max_num_batched_tokens": st.integers(1, 8192),
                  "chunked_prefill": st.booleans(), "max_prefill_batch": st.integers(1, 64),
                  "max_decode_batch": st.integers(1, 256),
                  "mode": st.sampled_from(["hybrid", "time_share", "strict"]),
                  "inference_mode": st.sampled_from(["standard", "pd_separate", "prefill_only", "decode_only"]),
                  "time_share_decode_steps": st.integers(0, 8), "prefill_workers": st.integers(1, 4),
                  "decode_workers": st.integers(1, 4), "retry_on_worker_failure": st.booleans()},
    "backend": {"device": st.sampled_from(["auto", "cpu", "cuda", "cuda:1"]), "num_threads": st.integers(1, 8),
                "seed": st.integers(0, 2**40), "kernels": st.booleans()},
    "benchmark": {"warmup_runs": st.integers(0, 3), "repeats": st.integers(1, 5),
                  "min_output_tokens_per_s": st.floats(0, 1000), "max_mean_ttft_ms": st.floats(0, 1e4),
                  "max_mean_tpot_ms": st.floats(0, 1e4)},
}


def section(name: str) -> st.SearchStrategy:
    fields = {key: small_or_hostile(valid) for key, valid in SECTIONS[name].items()}
    known = st.fixed_dictionaries({}, optional=fields)
    return st.one_of(known, known, known, st.dictionaries(hostile_text, values, max_size=2), values)


config_dicts = st.fixed_dictionaries({}, optional={name: section(name) for name in SECTIONS}).flatmap(
    lambda d: st.one_of(st.just(d), st.builds(lambda extra: {**d, **extra},
                                              st.dictionaries(hostile_text, values, max_size=1))))
CONFIG_FIELDS = set(SECTIONS) | {"config"}


def use_config(data: Any) -> SageLLMConfig:
    """Build the config and everything the engine and the simulator derive from it before running."""
    from sagellm.core.pd import InferenceMode

    cfg = SageLLMConfig.from_dict(data)
    for block_bytes in (1, 368_640, 2**30):
        cfg.kv_cache.device_blocks(block_bytes)
        cfg.kv_cache.policy(block_bytes)
    for role in (None, InferenceMode.PREFILL_ONLY, InferenceMode.DECODE_ONLY):
        cfg.scheduler.limits(2048, role)
    cfg.to_dict()
    return cfg


@FUZZ
@given(config_dicts)
def test_sagellm_config_from_dict(data: Any) -> None:
    from sagellm.errors import ConfigError

    check(lambda: use_config(data), ConfigError, field_named(CONFIG_FIELDS))


# ---- workload specs and the requests they generate -------------------------------------------------

lengths = st.one_of(
    st.integers(min_value=1, max_value=4096),
    st.fixed_dictionaries({"kind": st.just("fixed"), "value": small_or_hostile(st.integers(1, 4096))}),
    st.fixed_dictionaries({"kind": st.just("uniform"), "low": small_or_hostile(st.integers(1, 100)),
                           "high": small_or_hostile(st.integers(100, 4096))}),
    st.fixed_dictionaries({"kind": st.just("lognormal"), "median": small_or_hostile(st.floats(1, 2000)),
                           "sigma": small_or_hostile(st.floats(0.01, 3))},
                          optional={"min": small_or_hostile(st.integers(1, 10)),
                                    "max": small_or_hostile(st.integers(10, 10**6))}),
    values,
)
arrivals = st.one_of(
    st.fixed_dictionaries({"kind": st.sampled_from(["poisson", "constant"]),
                           "rate": small_or_hostile(st.floats(0.01, 1e4))}),
    st.fixed_dictionaries({"kind": st.just("gamma"), "rate": small_or_hostile(st.floats(0.01, 1e4)),
                           "cv": small_or_hostile(st.floats(0.01, 10))}),
    st.fixed_dictionaries({"kind": st.just("replay"), "path": small_or_hostile(st.just("missing.csv"))},
                          optional={"time_scale": small_or_hostile(st.floats(0.1, 10))}),
    values,
)
workloads = st.fixed_dictionaries({"arrival": arrivals}, optional={
    "num_requests": small_or_hostile(st.integers(1, 10**7)),
    "duration": small_or_hostile(st.floats(0.1, 1e6)),
    "seed": small_or_hostile(st.integers(-(2**70), 2**70)),
    "prompt_len": lengths,
    "output_len": lengths,
    "max_prompt_len": small_or_hostile(st.integers(1, 10**8)),
    "max_output_len": small_or_hostile(st.integers(1, 10**8)),
    "shared_prefix": st.one_of(st.fixed_dictionaries({"num_groups": small_or_hostile(st.integers(1, 10)),
                                                      "length": small_or_hostile(st.integers(1, 4096))},
                                                     optional={"fraction": small_or_hostile(st.floats(0, 1))}),
                               values),
    "conversation": st.one_of(st.fixed_dictionaries({"turns": small_or_hostile(st.integers(1, 10)),
                                                     "user_len": lengths,
                                                     "think_time_s": small_or_hostile(st.floats(0.01, 100))}),
                              values),
})


def take_requests(data: Any, base: Path) -> None:
    """Parse the spec, then draw its first requests and their prompt ids as the simulator would
    (only prompts that fit a 8192-token context window get ids)."""
    from simulator.workloads import WorkloadSpec, generate, prompt_token_ids, summarize

    spec = WorkloadSpec.from_dict(data)
    reqs = list(itertools.islice(generate(spec, base), 40))
    summarize(reqs)
    for i, r in enumerate(reqs[:5]):
        if r.prompt_len < 8192:
            assert len(prompt_token_ids(r, 49152, i)) == r.prompt_len


@FUZZ
@given(workloads)
def test_workload_specs_and_their_requests(tmp_path_factory: pytest.TempPathFactory, data: Any) -> None:
    from simulator.workloads import WorkloadError

    base = tmp_path_factory.getbasetemp()
    check(lambda: take_requests(data, base), WorkloadError, field_named({"workload"}))


# ---- trace files ---------------------------------------------------------------------------------------

cells = st.one_of(st.integers(-5, 10**20).map(str), st.floats(allow_nan=True).map(repr),
                  st.text(alphabet=string.printable, max_size=8), st.just(""), st.just("1 2 3"))
csv_rows = st.lists(st.lists(cells, min_size=2, max_size=5).map(",".join), max_size=6)
json_rows = st.lists(st.one_of(
    st.fixed_dictionaries({}, optional={"arrival_time": small_or_hostile(st.floats(0, 100)),
                                        "timestamp": small_or_hostile(st.integers(0, 10**6)),
                                        "prompt_len": small_or_hostile(st.integers(1, 4096)),
                                        "output_len": small_or_hostile(st.integers(1, 4096)),
                                        "request_id": small_or_hostile(st.text(max_size=6)),
                                        "prompt_token_ids": small_or_hostile(token_ids),
                                        "hash_ids": small_or_hostile(token_ids),
                                        "prefix_group": small_or_hostile(st.integers(0, 10)),
                                        "prefix_len": small_or_hostile(st.integers(0, 100))}).map(
        lambda d: json.dumps(d, allow_nan=True)),
    st.text(max_size=30)), max_size=6)
headers = st.sampled_from(["arrival_time,prompt_len,output_len", "arrived_at,num_prefill_tokens,num_decode_tokens",
                           "arrival_time,prompt_len,output_len,prompt_token_ids,prefix_group,prefix_len",
                           "arrival_time,prompt_len", "a,b,c", ""])
trace_files = st.one_of(
    st.tuples(st.just(".csv"), st.builds(lambda h, rows: "\n".join([h, *rows]), headers, csv_rows)),
    st.tuples(st.just(".jsonl"), json_rows.map("\n".join)),
    st.tuples(st.sampled_from([".csv", ".jsonl"]), st.binary(max_size=200)),
)


def read_both(path: Path) -> None:
    from simulator.trace_io import read_lengths, read_trace

    read_trace(path)
    read_lengths(path, ("prompt_len", "num_prefill_tokens", "input_length"))


@FUZZ
@given(trace_files)
def test_trace_files(trace: tuple[str, str | bytes]) -> None:
    from simulator.workloads import WorkloadError

    suffix, content = trace
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"trace{suffix}"
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
        check(lambda: read_both(path), WorkloadError, lambda message: str(path) in message)


# ---- simulation and experiment YAML files ---------------------------------------------------------

def simulation_dicts() -> st.SearchStrategy:
    return st.fixed_dictionaries({"workload": workloads}, optional={
        "name": small_or_hostile(st.text(max_size=8)),
        "model": small_or_hostile(st.sampled_from(["smollm2-135m", "llama-2-7b", "no-such-model"])),
        "hardware": small_or_hostile(st.sampled_from(["local", "a100-80gb-sxm", "h100-80gb-sxm", "tpu"])),
        "sagellm": config_dicts,
        "cluster": st.one_of(st.fixed_dictionaries({}, optional={
            "num_replicas": small_or_hostile(st.integers(1, 64)),
            "router": small_or_hostile(st.sampled_from(["round_robin", "least_outstanding", "magic"]))}), values),
        "slo": st.one_of(st.fixed_dictionaries({}, optional={"ttft_ms": small_or_hostile(st.floats(1, 1e4)),
                                                             "tpot_ms": small_or_hostile(st.floats(1, 1e3))}),
                         values),
        "memory_utilization": small_or_hostile(st.floats(0.1, 1)),
        "kv_sample_interval": small_or_hostile(st.floats(0, 10)),
    })


def experiment_dicts() -> st.SearchStrategy:
    live = st.one_of(st.fixed_dictionaries({}, optional={
        "repeats": small_or_hostile(st.integers(1, 5)), "warmup_requests": small_or_hostile(st.integers(0, 8)),
        "serving_reference_s": small_or_hostile(st.floats(1, 30))}), values)
    sweep = st.one_of(st.dictionaries(st.sampled_from(["workload.arrival.rate", "sagellm.scheduler.max_num_seqs",
                                                       "cluster.num_replicas", "nope.field"]),
                                      st.lists(scalars, max_size=3), max_size=2), values)
    return simulation_dicts().flatmap(lambda sim: st.fixed_dictionaries({}, optional={
        "description": small_or_hostile(st.text(max_size=8)),
        "sides": small_or_hostile(st.lists(st.sampled_from(["simulate", "live", "dream"]), max_size=2)),
        "live": live, "sweep": sweep, "calibrate": small_or_hostile(st.booleans())}).map(
        lambda extra: {**sim, "name": "fuzz", **extra}))


def yaml_text(data: dict[str, Any]) -> st.SearchStrategy:
    """The dict as YAML, sometimes with one value repeated through an anchor and aliases."""
    text = yaml.safe_dump(data, allow_unicode=True)
    return st.one_of(st.just(text), st.just(text.replace("workload:", "workload: &w\n  x: 1\nother: *w\nw2:", 1)),
                     st.builds(lambda cut: text[:cut], st.integers(0, len(text))))


EXPERIMENT_FIELDS = {"name", "description", "model", "hardware", "sides", "sagellm", "workload", "slo", "cluster",
                     "live", "calibrate", "sweep", "memory_utilization", "kv_sample_interval", "experiment", "other",
                     "w2", "variants", "resume"}


def _load(kind: str, text: str) -> None:
    from experiments.config import ExperimentConfig
    from simulator.config import SimulationConfig

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{kind}.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        loader = SimulationConfig.from_yaml if kind == "simulation" else ExperimentConfig.from_yaml
        try:
            loader(path)
        except InputError as exc:
            # A file-level error names the file instead of a field.
            if str(path) in str(exc):
                return
            raise


@FUZZ
@given(simulation_dicts().flatmap(yaml_text))
def test_simulation_yaml_files(text: str) -> None:
    check(lambda: _load("simulation", text), InputError,
          field_named(CONFIG_FIELDS | EXPERIMENT_FIELDS | {"sagellm", "workload", "cluster", "slo", "model",
                                                           "hardware"}))


@FUZZ
@given(experiment_dicts().flatmap(yaml_text))
def test_experiment_yaml_files(text: str) -> None:
    check(lambda: _load("experiment", text), InputError, field_named(EXPERIMENT_FIELDS | CONFIG_FIELDS))


def test_the_limits_catch_what_they_guard() -> None:
    """The guard itself fails an example that allocates too much or runs too long."""
    with pytest.raises(AssertionError, match="allocated"):
        with bounded():
            _ = [0] * (MEMORY_LIMIT // 4)
    with pytest.raises(Hang):
        with bounded(seconds=1):
            while True:
                math.sqrt(2.0)
