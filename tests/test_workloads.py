"""Tests of simulator.workloads and simulator.trace_io: spec validation, seeded generation (arrival
statistics, replay, empirical lengths, shared prefixes), synthetic token ids and trace file round trips."""

from __future__ import annotations

import csv
import itertools
import json
import statistics
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simulator.workloads import (
    MAX_NUM_REQUESTS,
    TraceRequest,
    WorkloadError,
    WorkloadSpec,
    generate,
    prompt_token_ids,
    read_trace,
    summarize,
    write_trace,
)

TRACES = Path(__file__).resolve().parents[1] / "data" / "traces"  # copies of ../shared/data/traces
AZURE_CONV = TRACES / "azure_conv.csv"
AZURE_CODE = TRACES / "azure_code.csv"
needs_azure = pytest.mark.skipif(not AZURE_CONV.is_file(), reason="Azure traces not present")

MOONCAKE_SNIPPET = """\
{"timestamp": 0, "input_length": 6955, "output_length": 52, "hash_ids": [0,1,2,3,4,5,6,7,8,9,10,11,12,13]}
{"timestamp": 0, "input_length": 6472, "output_length": 26, "hash_ids": [46,47,48,49,50,51,52,53,54,55,56,57,58]}
{"timestamp": 27482, "input_length": 6955, "output_length": 34, "hash_ids": [0,1,2,3,4,5,6,7,8,9,10,11,12,100]}
"""


def spec_of(**workload: Any) -> WorkloadSpec:
    base: dict[str, Any] = {
        "num_requests": 200,
        "seed": 0,
        "arrival": {"kind": "poisson", "rate": 5.0},
        "prompt_len": {"kind": "uniform", "low": 32, "high": 512},
        "output_len": {"kind": "fixed", "value": 16},
    }
    base.update(workload)
    return WorkloadSpec.from_dict({k: v for k, v in base.items() if v is not None})


def gaps(requests: list[TraceRequest]) -> list[float]:
    return [b.arrival_time - a.arrival_time for a, b in itertools.pairwise(requests)]


def cv(values: list[float]) -> float:
    return statistics.pstdev(values) / statistics.fmean(values)


def azure_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# --- generation -----------------------------------------------------------------------------------------------------


def test_same_spec_gives_identical_requests_and_seed_changes_them() -> None:
    spec = spec_of(shared_prefix={"num_groups": 3, "length": 64, "fraction": 0.5})
    first, second = list(generate(spec)), list(generate(spec))
    assert first == second and len(first) == 200
    other = list(generate(spec_of(seed=1, shared_prefix={"num_groups": 3, "length": 64, "fraction": 0.5})))
    assert [r.arrival_time for r in other] != [r.arrival_time for r in first]
    assert [r.prompt_len for r in other] != [r.prompt_len for r in first]


def test_streams_are_independent_of_other_distributions() -> None:
    a = list(generate(spec_of(output_len={"kind": "uniform", "low": 1, "high": 100})))
    b = list(generate(spec_of(prompt_len={"kind": "lognormal", "median": 100, "sigma": 1.0},
                              output_len={"kind": "uniform", "low": 1, "high": 100})))
    assert [r.arrival_time for r in a] == [r.arrival_time for r in b]
    assert [r.output_len for r in a] == [r.output_len for r in b]
    assert [r.prompt_len for r in a] != [r.prompt_len for r in b]


def test_poisson_rate_and_exponential_gaps() -> None:
    reqs = list(generate(spec_of(num_requests=20_000, arrival={"kind": "poisson", "rate": 6.45})))
    assert reqs[0].arrival_time == 0.0
    assert summarize(reqs)["mean_rate"] == pytest.approx(6.45, rel=0.03)
    assert cv(gaps(reqs)) == pytest.approx(1.0, abs=0.05)
    assert [r.request_id for r in reqs[:2]] == ["req-000000", "req-000001"]


def test_gamma_gaps_have_configured_cv_and_rate() -> None:
    reqs = list(generate(spec_of(num_requests=50_001, arrival={"kind": "gamma", "rate": 2.0, "cv": 3.0})))
    assert cv(gaps(reqs)) == pytest.approx(3.0, rel=0.10)
    assert summarize(reqs)["mean_rate"] == pytest.approx(2.0, rel=0.05)


def test_constant_arrivals_are_exact() -> None:
    reqs = list(generate(spec_of(num_requests=1000, arrival={"kind": "constant", "rate": 3.0})))
    assert [r.arrival_time for r in reqs] == [i / 3.0 for i in range(1000)]


def test_duration_bounds_arrivals_and_generation_is_lazy() -> None:
    reqs = list(generate(spec_of(num_requests=None, duration=10.0, arrival={"kind": "constant", "rate": 2.0})))
    assert len(reqs) == 20 and reqs[-1].arrival_time == 9.5
    huge = generate(spec_of(num_requests=MAX_NUM_REQUESTS))
    assert len(list(itertools.islice(huge, 5))) == 5
    with pytest.raises(WorkloadError, match=r"workload\.num_requests: must be <= 2000000"):
        spec_of(num_requests=10**12)


def test_length_caps_and_distribution_bounds() -> None:
    reqs = list(generate(spec_of(num_requests=2000, prompt_len={"kind": "lognormal", "median": 1020, "sigma": 1.0,
                                                                  "min": 8, "max": 4096},
                                 max_prompt_len=2048, output_len={"kind": "uniform", "low": 5, "high": 9},
                                 max_output_len=7)))
    prompts = [r.prompt_len for r in reqs]
    assert min(prompts) >= 8 and max(prompts) == 2048
    assert statistics.median(prompts) == pytest.approx(1020, rel=0.1)
    assert {r.output_len for r in reqs} == {5, 6, 7}


@needs_azure
def test_replay_reproduces_azure_rows_and_time_scale_halves_gaps() -> None:
    rows = azure_rows(AZURE_CONV)[:100]
    replay = {"kind": "replay", "path": str(AZURE_CONV)}
    reqs = list(generate(spec_of(num_requests=100, arrival=replay, prompt_len=None, output_len=None)))
    assert [(r.arrival_time, r.prompt_len, r.output_len) for r in reqs] == [
        (float(row["arrived_at"]), int(row["num_prefill_tokens"]), int(row["num_decode_tokens"])) for row in rows
    ]
    fast = list(generate(spec_of(num_requests=100, arrival={**replay, "time_scale": 0.5}, prompt_len=None,
                                 output_len=None)))
    assert [r.prompt_len for r in fast] == [r.prompt_len for r in reqs]
    assert gaps(fast) == pytest.approx([g / 2 for g in gaps(reqs)], abs=1e-9)
    everything = list(generate(WorkloadSpec.from_dict({"arrival": replay}, field="w")))
    assert len(everything) == len(azure_rows(AZURE_CONV))
    with pytest.raises(WorkloadError, match=r"w\.num_requests: 1000000 exceeds"):
        generate(WorkloadSpec.from_dict({"arrival": replay, "num_requests": 10**6}, field="w"))


@needs_azure
def test_replay_with_relative_path_and_overridden_output() -> None:
    spec = spec_of(num_requests=50, arrival={"kind": "replay", "path": "azure_code.csv"}, prompt_len=None,
                   output_len={"kind": "fixed", "value": 3})
    reqs = list(generate(spec, base_dir=TRACES))
    assert [r.prompt_len for r in reqs] == [int(row["num_prefill_tokens"]) for row in azure_rows(AZURE_CODE)[:50]]
    assert {r.output_len for r in reqs} == {3}


def test_replay_keeps_trace_ids_only_while_they_describe_the_prompt(tmp_path: Path) -> None:
    rows = [TraceRequest(f"r{i}", float(i), 4, 2, prompt_token_ids=(i, 1, 2, 3)) for i in range(3)]
    write_trace(tmp_path / "t.jsonl", rows)
    replay = {"kind": "replay", "path": "t.jsonl"}
    same = list(generate(spec_of(num_requests=None, arrival=replay, prompt_len=None, output_len=None), tmp_path))
    assert same == rows
    capped = list(generate(spec_of(num_requests=2, arrival=replay, prompt_len=None, output_len=None,
                                   max_prompt_len=3), tmp_path))
    assert [(r.request_id, r.prompt_len, r.prompt_token_ids) for r in capped] == [("r0", 3, None), ("r1", 3, None)]


@needs_azure
def test_empirical_lengths_only_draw_values_of_the_file() -> None:
    rows = azure_rows(AZURE_CONV)
    prompts, outputs = {int(r["num_prefill_tokens"]) for r in rows}, {int(r["num_decode_tokens"]) for r in rows}
    emp = {"kind": "empirical", "path": str(AZURE_CONV)}
    reqs = list(generate(spec_of(num_requests=5000, prompt_len=emp, output_len=emp)))
    assert {r.prompt_len for r in reqs} <= prompts and {r.output_len for r in reqs} <= outputs
    assert len({r.prompt_len for r in reqs}) > 500  # actually resampled, not a constant
    explicit = list(generate(spec_of(num_requests=300, prompt_len={**emp, "column": "num_decode_tokens"})))
    assert {r.prompt_len for r in explicit} <= outputs


@needs_azure
def test_100k_poisson_with_empirical_azure_lengths() -> None:
    emp = {"kind": "empirical", "path": str(AZURE_CONV)}
    reqs = generate(spec_of(num_requests=100_000, arrival={"kind": "poisson", "rate": 6.45}, prompt_len=emp,
                            output_len=emp))
    count = sum(1 for _ in reqs)
    assert count == 100_000


# --- shared prefixes and token ids -----------------------------------------------------------------------------------


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_shared_prefix_fraction_groups_and_token_ids() -> None:
    spec = spec_of(num_requests=10_000, shared_prefix={"num_groups": 4, "length": 256, "fraction": 0.3})
    reqs = list(generate(spec))
    grouped = [r for r in reqs if r.prefix_group is not None]
    assert len(grouped) / len(reqs) == pytest.approx(0.3, abs=0.02)
    assert {r.prefix_group for r in grouped} == {0, 1, 2, 3}
    assert all(r.prefix_len == 256 and r.prompt_len >= 257 for r in grouped)
    assert all(r.prefix_len == 0 for r in reqs if r.prefix_group is None)
    ids = {r.request_id: prompt_token_ids(r, 49152, i) for i, r in enumerate(reqs)}
    by_group = {g: [r for r in grouped if r.prefix_group == g] for g in range(4)}
    for members in by_group.values():
        a, b = members[0], members[1]
        assert common_prefix(ids[a.request_id], ids[b.request_id]) == 256
    firsts = [ids[members[0].request_id][0] for members in by_group.values()]
    ungrouped_firsts = [ids[r.request_id][0] for r in reqs if r.prefix_group is None]
    assert len(set(firsts)) == 4 and not set(firsts) & set(ungrouped_firsts)
    assert len(set(ungrouped_firsts)) == len(ungrouped_firsts)


@settings(max_examples=200, deadline=None)
@given(vocab=st.integers(2, 60_000), prompt_len=st.integers(1, 3000), prefix_len=st.integers(0, 3000),
       group=st.integers(0, 50), i=st.integers(0, 10**6), j=st.integers(0, 10**6))
def test_synthetic_token_ids_contract(vocab: int, prompt_len: int, prefix_len: int, group: int, i: int,
                                      j: int) -> None:
    prefix_len = min(prefix_len, prompt_len - 1)
    req = TraceRequest("r", 0.0, prompt_len, 1, prefix_group=group if prefix_len else None, prefix_len=prefix_len)
    a, b = prompt_token_ids(req, vocab, i), prompt_token_ids(req, vocab, j)
    assert len(a) == prompt_len and a == prompt_token_ids(req, vocab, i)
    assert 0 <= min(a) and max(a) < vocab
    space = vocab - max(1, min(4096, vocab // 8))
    if i % space != j % space:  # distinct remainders: the group members share exactly the prefix
        assert common_prefix(a, b) == prefix_len


def test_trace_ids_are_returned_and_checked() -> None:
    req = TraceRequest("r", 0.0, 3, 1, prompt_token_ids=(5, 6, 7))
    assert prompt_token_ids(req, 8, 0) == [5, 6, 7]
    with pytest.raises(WorkloadError, match="prompt_token_ids"):
        prompt_token_ids(req, 7, 0)


def test_mooncake_jsonl_parses_and_hash_blocks_give_shared_tokens(tmp_path: Path) -> None:
    path = tmp_path / "mooncake.jsonl"
    path.write_text(MOONCAKE_SNIPPET)
    reqs = read_trace(path)
    assert [(r.arrival_time, r.prompt_len, r.output_len) for r in reqs] == [
        (0.0, 6955, 52), (0.0, 6472, 26), (27.482, 6955, 34)]
    assert reqs[0].block_hash_ids == tuple(range(14)) and reqs[2].block_hash_ids[-1] == 100
    ids = [prompt_token_ids(r, 32000, i) for i, r in enumerate(reqs)]
    assert common_prefix(ids[0], ids[2]) == 13 * 512  # 13 equal hash blocks, then different
    assert ids[0][0] != ids[1][0]


# --- trace files -----------------------------------------------------------------------------------------------------


@needs_azure
@pytest.mark.parametrize("path", [AZURE_CONV, AZURE_CODE])
def test_azure_traces_read_as_they_are(path: Path) -> None:
    rows = azure_rows(path)
    reqs = read_trace(path)
    assert len(reqs) == len(rows)
    assert (reqs[-1].arrival_time, reqs[-1].prompt_len) == (float(rows[-1]["arrived_at"]),
                                                           int(rows[-1]["num_prefill_tokens"]))
    assert reqs[5].request_id == "req-000005"


@st.composite
def traces(draw: st.DrawFn) -> list[TraceRequest]:
    n = draw(st.integers(1, 12))
    times = sorted(draw(st.lists(st.floats(0, 1e9, allow_nan=False), min_size=n, max_size=n)))
    ids = draw(st.lists(st.text(st.characters(blacklist_categories=("Cs",)), min_size=1), min_size=n, max_size=n,
                        unique=True))
    out = []
    for rid, t in zip(ids, times):
        prompt = draw(st.integers(1, 40))
        group = draw(st.none() | st.integers(0, 9))
        out.append(TraceRequest(
            rid, t, prompt, draw(st.integers(1, 10**6)),
            prompt_token_ids=draw(st.none() | st.tuples(*[st.integers(0, 10**6)] * prompt)),
            block_hash_ids=draw(st.none() | st.lists(st.integers(0, 2**62), min_size=1, max_size=5).map(tuple)),
            prefix_group=group, prefix_len=draw(st.integers(0, prompt)) if group is not None else 0,
        ))
    return out


@settings(max_examples=60, deadline=None)
@given(reqs=traces(), suffix=st.sampled_from([".jsonl", ".csv"]))
def test_write_then_read_round_trips_exactly(tmp_path_factory: pytest.TempPathFactory, reqs: list[TraceRequest],
                                             suffix: str) -> None:
    path = tmp_path_factory.mktemp("rt") / f"trace{suffix}"
    write_trace(path, reqs)
    assert read_trace(path) == reqs


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("t.csv", "arrived_at,num_prefill_tokens,num_decode_tokens\n", r"t\.csv: empty trace \(no rows\)"),
        ("t.csv", "", r"t\.csv: empty trace"),
        ("t.jsonl", "\n", r"t\.jsonl: empty trace \(no rows\)"),
        ("t.csv", "arrived_at,num_prefill_tokens\n0,5\n", r"t\.csv: line 1: missing column 'output_len'"),
        ("t.csv", "arrived_at,num_prefill_tokens,num_decode_tokens\n0,5,3\n1,x,3\n", r"line 3: prompt_len: .*'x'"),
        ("t.csv", "arrived_at,num_prefill_tokens,num_decode_tokens\n0,5,0\n", r"line 2: output_len: must be in .*0"),
        ("t.csv", "arrival_time,prompt_len,output_len\n2,5,1\n1,5,1\n", r"line 3: arrival_time: .* before"),
        ("t.jsonl", '{"arrival_time": 0, "prompt_len": 0, "output_len": 1}\n', r"line 1: prompt_len: must be in .*0"),
        ("t.jsonl", '{"arrival_time": 0, "output_len": 1}\n', r"line 1: missing field 'prompt_len'"),
        ("t.jsonl", '{"arrival_time": "soon", "prompt_len": 2, "output_len": 1}\n', r"line 1: arrival_time"),
        ("t.jsonl", "[1, 2]\n", r"line 1: expected a JSON object"),
        ("t.txt", "x", r"unsupported trace format"),
    ],
)
def test_bad_trace_files_name_file_line_and_field(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(WorkloadError, match=message):
        read_trace(path)


def test_missing_and_empty_trace_files_in_specs(tmp_path: Path) -> None:
    with pytest.raises(WorkloadError, match=r"workload\.arrival\.path: .*nope\.csv: no such trace file"):
        generate(spec_of(arrival={"kind": "replay", "path": "nope.csv"}), base_dir=tmp_path)
    (tmp_path / "empty.csv").write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n")
    with pytest.raises(WorkloadError, match=r"workload\.prompt_len\.path: .*empty\.csv: empty trace"):
        generate(spec_of(prompt_len={"kind": "empirical", "path": "empty.csv"}), base_dir=tmp_path)
    (tmp_path / "lens.csv").write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0,5,3\n")
    with pytest.raises(WorkloadError, match=r"workload\.output_len\.path: .*lens\.csv: line 1: missing column 'foo'"):
        generate(spec_of(output_len={"kind": "empirical", "path": "lens.csv", "column": "foo"}), base_dir=tmp_path)
    assert {r.output_len for r in generate(spec_of(output_len={"kind": "empirical", "path": "lens.csv"}),
                                           base_dir=tmp_path)} == {3}


def test_summarize_constant_workload() -> None:
    s = summarize(generate(spec_of(num_requests=11, arrival={"kind": "constant", "rate": 2.0},
                                   prompt_len={"kind": "fixed", "value": 100})))
    assert s == {"count": 11, "duration": 5.0, "mean_rate": 2.0, "prompt_len_mean": 100, "prompt_len_median": 100,
                 "prompt_len_max": 100, "output_len_mean": 16, "output_len_median": 16, "output_len_max": 16}
    assert summarize([])["count"] == 0


# --- spec validation -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"arrival": {"kind": "poisson", "rate": -1}}, r"^workload\.arrival\.rate: must be > 0, got -1$"),
        ({"arrival": {"kind": "gamma", "rate": 1, "cv": 0}}, r"^workload\.arrival\.cv: must be >= 0\.001"),
        ({"arrival": {"kind": "gamma", "rate": 1}}, r"^workload\.arrival\.cv: required"),
        ({"arrival": {"kind": "bursty", "rate": 1}}, r"^workload\.arrival\.kind: unknown kind 'bursty'; allowed: "
                                                     r"poisson, gamma, constant, replay"),
        ({"arrival": {"kind": "poisson", "rate": 1, "cv": 2}}, r"^workload\.arrival: unknown key 'cv'"),
        ({"arrival": None}, r"^workload\.arrival: required"),
        ({"arrivals": 3}, r"^workload: unknown key 'arrivals'; allowed: num_requests, duration, seed, arrival"),
        ({"output_len": {"kind": "fixed", "value": 0}}, r"^workload\.output_len\.value: must be >= 1, got 0"),
        ({"output_len": 0}, r"^workload\.output_len\.value: must be >= 1, got 0"),
        ({"prompt_len": {"kind": "lognormal", "median": 100, "sigma": 0}},
         r"^workload\.prompt_len\.sigma: must be > 0"),
        ({"prompt_len": {"kind": "uniform", "low": 10, "high": 5}}, r"^workload\.prompt_len\.high: must be >= 10"),
        ({"prompt_len": {"kind": "empirical"}}, r"^workload\.prompt_len\.path: must be a non-empty string"),
        ({"prompt_len": None}, r"^workload\.prompt_len: required unless"),
        ({"num_requests": None}, r"^workload\.num_requests: required unless"),
        ({"num_requests": 2.5}, r"^workload\.num_requests: must be an integer"),
        ({"duration": 0}, r"^workload\.duration: must be > 0"),
        ({"shared_prefix": {"num_groups": 2, "length": 64, "fraction": 1.5}},
         r"^workload\.shared_prefix\.fraction: must be <= 1"),
        ({"shared_prefix": {"num_groups": 2, "length": 64}, "max_prompt_len": 64},
         r"^workload\.shared_prefix\.length: must be < max_prompt_len=64"),
        ({"arrival": {"kind": "replay", "path": "x.csv", "time_scale": 0}}, r"^workload\.arrival\.time_scale"),
    ],
)
def test_bad_specs_name_the_field(change: dict[str, Any], message: str) -> None:
    base: dict[str, Any] = {"num_requests": 10, "arrival": {"kind": "poisson", "rate": 1.0},
                            "prompt_len": {"kind": "fixed", "value": 8}, "output_len": {"kind": "fixed", "value": 8}}
    base.update(change)
    with pytest.raises(WorkloadError, match=message):
        WorkloadSpec.from_dict({k: v for k, v in base.items() if v is not None or k == "arrival"})


def test_spec_accepts_wrapped_yaml_dict_and_json_round_trip() -> None:
    d = {"num_requests": 5, "arrival": {"kind": "constant", "rate": 1}, "prompt_len": 8, "output_len": 4}
    assert WorkloadSpec.from_dict({"workload": d}) == WorkloadSpec.from_dict(json.loads(json.dumps(d)))
