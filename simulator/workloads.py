"""Workloads for the simulator and the live engine: a validated spec, a lazy seeded request generator,
synthetic prompt token ids, and a summary. Trace files are read and written by `simulator.trace_io`.

A spec is a YAML-friendly dict (see `WorkloadSpec.from_dict`). `generate` is deterministic: the same
spec gives the same requests. Arrival times, prompt lengths, output lengths and shared-prefix choices
come from independent `random.Random` streams (seeded "<seed>-arrival", "<seed>-prompt_len", ...), so
changing one distribution leaves the others' draws unchanged. The first request arrives at t = 0 and
each following one after an independent inter-arrival gap; a replayed trace is rebased to its first
row (the Azure traces start at 0, so they replay with their exact times).
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
import random
import statistics
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sagellm.errors import show
from simulator.trace_io import (
    MAX_LENGTH,
    MOONCAKE_HASH_BLOCK_SIZE,
    OUTPUT_COLUMNS,
    PROMPT_COLUMNS,
    TraceRequest,
    WorkloadError,
    parse_float,
    parse_int,
    read_lengths,
    read_trace,
    write_trace,
)

__all__ = [
    "ArrivalSpec", "ConversationSpec", "LengthSpec", "SharedPrefixSpec", "TenantSpec", "TraceRequest", "WorkloadError",
    "WorkloadSpec", "generate",
    "prompt_token_ids", "read_trace", "summarize", "write_trace",
]

_MISSING: Any = object()

# Bounds far above any real workload, so that a typo cannot make a generator run without end or a
# request of astronomic length: a week of the Azure traces is ~10^6 requests; no model has a context
# window of MAX_LENGTH tokens; lognormal sigma above 10 or gamma CV outside [1e-3, 1e3] describe no traffic.
MAX_NUM_REQUESTS = 2_000_000
MAX_SIGMA = 10.0
CV_RANGE = (1e-3, 1e3)
MAX_TIME_SCALE = 1e6
MAX_SEED = 2**63


# --- spec ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArrivalSpec:
    """How requests arrive. kind 'poisson' (exponential gaps, mean 1/rate), 'gamma' (gamma gaps with
    mean 1/rate and coefficient of variation cv), 'constant' (gaps of exactly 1/rate) or 'replay'
    (the arrival times of the trace at `path`, gaps multiplied by `time_scale`)."""

    kind: str
    rate: float | None = None
    cv: float | None = None
    path: str | None = None
    time_scale: float = 1.0


@dataclass(frozen=True)
class LengthSpec:
    """A token-length distribution, every value >= 1. kind 'fixed' (value), 'uniform' (inclusive
    ints low..high), 'lognormal' (round(median * exp(sigma * N(0,1))) clamped to [min, max]) or
    'empirical' (values of `column` of the trace at `path`, sampled with replacement)."""

    kind: str
    value: int | None = None
    low: int | None = None
    high: int | None = None
    median: float | None = None
    sigma: float | None = None
    min: int = 1
    max: int | None = None
    path: str | None = None
    column: str | None = None


@dataclass(frozen=True)
class SharedPrefixSpec:
    """A `fraction` of the requests start with one of `num_groups` system prompts of `length` tokens
    (group chosen uniformly); their prompt_len includes the prefix and is at least length + 1."""

    num_groups: int
    length: int
    fraction: float = 1.0


@dataclass(frozen=True)
class ConversationSpec:
    """Multi-turn chats. The arrival process starts conversations; each has `turns` requests. Turn
    k's prompt is turn k-1's prompt, then its answer (output_len tokens, as the trace has it), then
    a new user message of `user_len` tokens, so it extends the previous prompt exactly; turn 0's
    prompt has prompt_len tokens. Turn k arrives an exponential gap of mean `think_time_s` after
    turn k-1 arrives (a trace fixes arrival times, so a turn may come before its predecessor ends).
    Prompts carry Mooncake-style block hash ids (one per 512 tokens, unique to the conversation);
    a conversation ends early when its next prompt would exceed max_prompt_len."""

    turns: int
    user_len: LengthSpec
    think_time_s: float


@dataclass(frozen=True)
class TenantSpec:
    """A class of requests: a `share` of the requests (relative to the other tenants' shares) come
    from tenant `name` with scheduling `priority` (lower is served first), their lengths drawn from
    the tenant's own `prompt_len` / `output_len` when given, else from the workload's."""

    name: str
    share: float
    priority: int = 0
    prompt_len: LengthSpec | None = None
    output_len: LengthSpec | None = None


MAX_TENANTS = 1000

_ARRIVAL_KEYS = {"poisson": ("rate",), "gamma": ("rate", "cv"), "constant": ("rate",), "replay": ("path", "time_scale")}
_LENGTH_KEYS = {
    "fixed": ("value",), "uniform": ("low", "high"), "lognormal": ("median", "sigma", "min", "max"),
    "empirical": ("path", "column"),
}
_WORKLOAD_KEYS = (
    "num_requests", "duration", "seed", "arrival", "prompt_len", "output_len", "shared_prefix",
    "max_prompt_len", "max_output_len", "conversation", "tenants",
)


def _mapping(value: Any, where: str, allowed: Iterable[str]) -> Mapping[str, Any]:
    """`value` as a mapping whose keys are all in `allowed`; WorkloadError naming the bad key otherwise."""
    if not isinstance(value, Mapping):
        raise WorkloadError(f"{where}: must be a mapping, got {show(value)}")
    allowed = tuple(allowed)
    for key in value:
        if key not in allowed:
            raise WorkloadError(f"{where}: unknown key {show(key)}; allowed: {', '.join(allowed)}")
    return value


def _num(d: Mapping[str, Any], key: str, where: str, *, integer: bool = False, default: Any = _MISSING,
         gt: float | None = None, ge: float | None = None, le: float | None = None, lt: float | None = None) -> Any:
    """`d[key]` checked to be a number (an int if `integer`) within the bounds; `default` if absent/null."""
    where = f"{where}.{key}"
    if d.get(key) is None:
        if default is _MISSING:
            raise WorkloadError(f"{where}: required")
        return default
    value = parse_int(d[key], where) if integer else parse_float(d[key], where)
    for bound, ok, op in ((gt, operator.gt, ">"), (ge, operator.ge, ">="), (le, operator.le, "<="),
                          (lt, operator.lt, "<")):
        if bound is not None and not ok(value, bound):
            raise WorkloadError(f"{where}: must be {op} {bound}, got {show(d[key])}")
    return value


def _kind(d: Mapping[str, Any], where: str, kinds: Mapping[str, tuple[str, ...]]) -> str:
    if d is None:
        raise WorkloadError(f"{where}: required")
    if not isinstance(d, Mapping):
        raise WorkloadError(f"{where}: must be a mapping, got {show(d)}")
    kind = d.get("kind")
    if kind not in kinds:
        raise WorkloadError(f"{where}.kind: {'required' if kind is None else f'unknown kind {show(kind)}'}; "
                            f"allowed: {', '.join(kinds)}")
    _mapping(d, where, ("kind", *kinds[kind]))
    return kind


def _path(d: Mapping[str, Any], where: str) -> str:
    if not isinstance(d.get("path"), str) or not d["path"]:
        raise WorkloadError(f"{where}.path: must be a non-empty string, got {show(d.get('path'))}")
    return d["path"]


def parse_arrival(d: Any, where: str) -> ArrivalSpec:
    """An ArrivalSpec from its dict; WorkloadError naming the field for anything invalid."""
    kind = _kind(d, where, _ARRIVAL_KEYS)
    if kind == "replay":
        return ArrivalSpec(kind, path=_path(d, where),
                           time_scale=_num(d, "time_scale", where, default=1.0, gt=0, le=MAX_TIME_SCALE))
    cv = _num(d, "cv", where, ge=CV_RANGE[0], le=CV_RANGE[1]) if kind == "gamma" else None
    return ArrivalSpec(kind, rate=_num(d, "rate", where, gt=0), cv=cv)


def parse_length(d: Any, where: str) -> LengthSpec:
    """A LengthSpec from its dict (a bare int means fixed); WorkloadError naming the field if invalid."""
    if isinstance(d, int) and not isinstance(d, bool):
        d = {"kind": "fixed", "value": d}
    kind = _kind(d, where, _LENGTH_KEYS)
    if kind == "fixed":
        return LengthSpec(kind, value=_num(d, "value", where, integer=True, ge=1, le=MAX_LENGTH))
    if kind == "uniform":
        low = _num(d, "low", where, integer=True, ge=1, le=MAX_LENGTH)
        return LengthSpec(kind, low=low, high=_num(d, "high", where, integer=True, ge=low, le=MAX_LENGTH))
    if kind == "lognormal":
        low = _num(d, "min", where, integer=True, default=1, ge=1, le=MAX_LENGTH)
        return LengthSpec(kind, median=_num(d, "median", where, gt=0, le=MAX_LENGTH),
                          sigma=_num(d, "sigma", where, gt=0, le=MAX_SIGMA),
                          min=low, max=_num(d, "max", where, integer=True, default=None, ge=low, le=MAX_LENGTH))
    column = d.get("column")
    if column is not None and (not isinstance(column, str) or not column):
        raise WorkloadError(f"{where}.column: must be a non-empty string or null, got {show(column)}")
    return LengthSpec(kind, path=_path(d, where), column=column)


def parse_conversation(d: Any, where: str) -> ConversationSpec:
    """A ConversationSpec from its dict; WorkloadError naming the field if invalid."""
    d = _mapping(d, where, ("turns", "user_len", "think_time_s"))
    if d.get("user_len") is None:
        raise WorkloadError(f"{where}.user_len: required (a length distribution)")
    return ConversationSpec(turns=_num(d, "turns", where, integer=True, ge=1, le=MAX_NUM_REQUESTS),
                            user_len=parse_length(d["user_len"], f"{where}.user_len"),
                            think_time_s=_num(d, "think_time_s", where, gt=0))


def parse_tenants(d: Any, where: str) -> tuple[TenantSpec, ...]:
    """The tenant classes from their list; WorkloadError naming the entry and field if invalid."""
    if not isinstance(d, list) or not 1 <= len(d) <= MAX_TENANTS:
        raise WorkloadError(f"{where}: must be a list of 1 to {MAX_TENANTS} tenants "
                            f"({{name, share, priority, prompt_len, output_len}}), got {show(d)}")
    tenants = []
    for i, entry in enumerate(d):
        at = f"{where}[{i}]"
        entry = _mapping(entry, at, ("name", "share", "priority", "prompt_len", "output_len"))
        name = entry.get("name")
        if not isinstance(name, str) or not name or name in {t.name for t in tenants}:
            raise WorkloadError(f"{at}.name: must be a non-empty string, unique among the tenants, got {show(name)}")
        lengths = {k: None if entry.get(k) is None else parse_length(entry[k], f"{at}.{k}")
                   for k in ("prompt_len", "output_len")}
        tenants.append(TenantSpec(name, _num(entry, "share", at, gt=0, le=1e12),
                                  _num(entry, "priority", at, integer=True, default=0, gt=-MAX_SEED, lt=MAX_SEED),
                                  **lengths))
    return tuple(tenants)


def parse_shared_prefix(d: Any, where: str) -> SharedPrefixSpec:
    """A SharedPrefixSpec from its dict; WorkloadError naming the field if invalid."""
    d = _mapping(d, where, ("num_groups", "length", "fraction"))
    return SharedPrefixSpec(num_groups=_num(d, "num_groups", where, integer=True, ge=1, le=MAX_NUM_REQUESTS),
                            length=_num(d, "length", where, integer=True, ge=1, le=MAX_LENGTH),
                            fraction=_num(d, "fraction", where, default=1.0, ge=0, le=1))


@dataclass(frozen=True)
class WorkloadSpec:
    """A validated workload: arrival process, length distributions (None: lengths of the replayed
    trace), how many requests (the first `num_requests` and/or those arriving before `duration`
    seconds; with neither, a replay takes every trace row), seed, optional shared prefixes and length caps.
    `name` is the dotted field path used in error messages."""

    arrival: ArrivalSpec
    prompt_len: LengthSpec | None
    output_len: LengthSpec | None
    num_requests: int | None = None
    duration: float | None = None
    seed: int = 0
    shared_prefix: SharedPrefixSpec | None = None
    max_prompt_len: int | None = None
    max_output_len: int | None = None
    conversation: ConversationSpec | None = None
    tenants: tuple[TenantSpec, ...] = ()
    name: str = field(default="workload", compare=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], field: str = "workload") -> WorkloadSpec:
        """Parse and validate a workload dict (or {'workload': {...}}); WorkloadError names the field."""
        if isinstance(d, Mapping) and set(d) == {field}:
            d = d[field]
        d = _mapping(d, field, _WORKLOAD_KEYS)
        arrival = parse_arrival(d.get("arrival"), f"{field}.arrival")
        replay = arrival.kind == "replay"
        lengths = {}
        for key in ("prompt_len", "output_len"):
            if d.get(key) is None and not replay:
                raise WorkloadError(f"{field}.{key}: required unless arrival.kind is 'replay'")
            lengths[key] = None if d.get(key) is None else parse_length(d[key], f"{field}.{key}")
        duration = _num(d, "duration", field, default=None, gt=0)
        num_requests = _num(d, "num_requests", field, integer=True, default=None, ge=1, le=MAX_NUM_REQUESTS)
        if num_requests is None and duration is None and not replay:
            raise WorkloadError(f"{field}.num_requests: required unless arrival.kind is 'replay' or duration is given")
        if num_requests is None and not replay and duration * arrival.rate > MAX_NUM_REQUESTS:
            raise WorkloadError(f"{field}.duration: {show(duration)} s at {arrival.rate} req/s is about "
                                f"{duration * arrival.rate:.3g} requests, more than {MAX_NUM_REQUESTS}; "
                                "shorten it or set num_requests")
        prefix = d.get("shared_prefix")
        prefix = None if prefix is None else parse_shared_prefix(prefix, f"{field}.shared_prefix")
        max_prompt = _num(d, "max_prompt_len", field, integer=True, default=None, ge=1, le=MAX_LENGTH)
        conversation = d.get("conversation")
        if conversation is not None:
            conversation = parse_conversation(conversation, f"{field}.conversation")
            if prefix is not None or replay:
                raise WorkloadError(f"{field}.conversation: cannot be combined with shared_prefix or a replayed trace")
            if num_requests is None:
                raise WorkloadError(f"{field}.num_requests: required with conversation")
        tenants = () if d.get("tenants") is None else parse_tenants(d["tenants"], f"{field}.tenants")
        if tenants and conversation is not None:
            raise WorkloadError(f"{field}.tenants: cannot be combined with conversation")
        if prefix is not None and max_prompt is not None and max_prompt <= prefix.length:
            raise WorkloadError(
                f"{field}.shared_prefix.length: must be < max_prompt_len={max_prompt}, got {prefix.length}"
            )
        return cls(arrival, lengths["prompt_len"], lengths["output_len"], num_requests=num_requests,
                   duration=duration, seed=_num(d, "seed", field, integer=True, default=0, gt=-MAX_SEED, lt=MAX_SEED),
                   shared_prefix=prefix, max_prompt_len=max_prompt,
                   max_output_len=_num(d, "max_output_len", field, integer=True, default=None, ge=1, le=MAX_LENGTH),
                   conversation=conversation, tenants=tenants, name=field)


# --- generation ---------------------------------------------------------------------------------------------------


def _arrival_times(spec: ArrivalSpec, rows: list[TraceRequest] | None, rng: random.Random) -> Iterator[float]:
    """Infinite (or, for replay, per-row) arrival times starting at 0."""
    if rows is not None:
        t0 = rows[0].arrival_time
        return ((r.arrival_time - t0) * spec.time_scale for r in rows)
    rate = spec.rate
    if spec.kind == "constant":
        return (i / rate for i in itertools.count())
    if spec.kind == "poisson":
        gaps = (rng.expovariate(rate) for _ in itertools.count())
    else:
        shape = 1.0 / spec.cv**2
        gaps = (rng.gammavariate(shape, 1.0 / (shape * rate)) for _ in itertools.count())
    return itertools.accumulate(itertools.chain((0.0,), gaps))


def _length_sampler(spec: LengthSpec | None, rng: random.Random, base: Path, where: str,
                    rows: list[TraceRequest] | None) -> Callable[[int], int]:
    """A function from request index to a sampled length (the trace row's length if `spec` is None)."""
    if spec is None:
        attr = where.rsplit(".", 1)[-1]
        return lambda i: getattr(rows[i], attr)
    if spec.kind == "fixed":
        return lambda i: spec.value
    if spec.kind == "uniform":
        return lambda i: rng.randint(spec.low, spec.high)
    if spec.kind == "lognormal":
        mu, hi = math.log(spec.median), spec.max or MAX_LENGTH
        return lambda i: round(min(hi, max(spec.min, rng.lognormvariate(mu, spec.sigma))))
    default = PROMPT_COLUMNS if where.endswith("prompt_len") else OUTPUT_COLUMNS
    columns = (spec.column,) if spec.column else (default[1], default[0], default[2])
    try:
        values = read_lengths(base / spec.path, columns)
    except WorkloadError as exc:
        raise WorkloadError(f"{where}.path: {exc}") from None
    n, draw = len(values), rng.random
    return lambda i: values[int(draw() * n)]  # uniform row; 3x faster than rng.choice, bias < n / 2**53


def _prefix_sampler(spec: SharedPrefixSpec | None, rng: random.Random) -> Callable[[], tuple[int | None, int]]:
    """A function returning (group, prefix_len) for the next request: (None, 0) when not grouped."""
    if spec is None:
        return lambda: (None, 0)
    return lambda: (rng.randrange(spec.num_groups), spec.length) if rng.random() < spec.fraction else (None, 0)


def _replay_rows(spec: WorkloadSpec, base: Path) -> list[TraceRequest] | None:
    if spec.arrival.kind != "replay":
        return None
    try:
        rows = read_trace(base / spec.arrival.path)
    except WorkloadError as exc:
        raise WorkloadError(f"{spec.name}.arrival.path: {exc}") from None
    if spec.num_requests is not None and spec.num_requests > len(rows):
        raise WorkloadError(f"{spec.name}.num_requests: {spec.num_requests} exceeds the {len(rows)} rows of "
                            f"{spec.arrival.path}")
    return rows


def _from_row(row: TraceRequest, req: TraceRequest) -> TraceRequest:
    """`req` (generated for a replayed `row`) with the row's id, and its token/hash ids and prefix when
    they still describe the prompt: ids only if the prompt length is unchanged and no new group was set."""
    same = req.prompt_len == row.prompt_len and req.prefix_group is None
    keep_prefix = req.prefix_group is None and row.prefix_len < req.prompt_len
    drawn = bool(req.tenant)  # the spec's tenant classes override the row's
    return TraceRequest(
        row.request_id, req.arrival_time, req.prompt_len, req.output_len,
        row.prompt_token_ids if same else None, row.block_hash_ids if same else None,
        row.prefix_group if keep_prefix else req.prefix_group, row.prefix_len if keep_prefix else req.prefix_len,
        req.tenant if drawn else row.tenant, req.priority if drawn else row.priority,
    )


def generate(spec: WorkloadSpec, base_dir: str | Path = ".") -> Iterator[TraceRequest]:
    """The requests of `spec`, lazily, in arrival order; the same spec gives the same sequence.
    Trace files (replay, empirical) are read at call time, relative paths against `base_dir`, and
    their errors raised then as WorkloadError naming the spec field and the file."""
    base = Path(base_dir)
    rows = _replay_rows(spec, base)
    streams = {name: random.Random(f"{spec.seed}-{name}") for name in ("arrival", "prompt_len", "output_len", "prefix")}
    arrivals = _arrival_times(spec.arrival, rows, streams["arrival"])
    prompt = _length_sampler(spec.prompt_len, streams["prompt_len"], base, f"{spec.name}.prompt_len", rows)
    output = _length_sampler(spec.output_len, streams["output_len"], base, f"{spec.name}.output_len", rows)
    prefix = _prefix_sampler(spec.shared_prefix, streams["prefix"])
    if spec.conversation is not None:
        return _conversations(spec, arrivals, prompt, output, base)
    tenant = _tenant_sampler(spec, base, rows)
    return _requests(spec, itertools.islice(arrivals, spec.num_requests), prompt, output, prefix, rows, tenant)


CONVERSATION_HASH_STRIDE = 1 << 20  # hash ids of conversation c: c * stride + block index


def _conversations(spec: WorkloadSpec, starts: Iterator[float], prompt: Callable[[int], int],
                   output: Callable[[int], int], base: Path) -> Iterator[TraceRequest]:
    conv = spec.conversation
    rng = random.Random(f"{spec.seed}-conversation")
    user = _length_sampler(conv.user_len, random.Random(f"{spec.seed}-user_len"), base,
                           f"{spec.name}.conversation.user_len", None)
    duration = math.inf if spec.duration is None else spec.duration
    max_prompt, max_output = spec.max_prompt_len or math.inf, spec.max_output_len or math.inf
    block = MOONCAKE_HASH_BLOCK_SIZE
    out: list[TraceRequest] = []
    for c, start in enumerate(starts):
        if len(out) >= spec.num_requests or start >= duration:
            break
        t, length = start, min(prompt(c), max_prompt)
        for k in range(conv.turns):
            if len(out) >= spec.num_requests or t >= duration or length > max_prompt:
                break
            o = min(output(len(out)), max_output)
            hashes = tuple(c * CONVERSATION_HASH_STRIDE + j for j in range(-(-length // block)))
            out.append(TraceRequest(f"conv-{c:05d}-turn-{k:02d}", t, length, o, None, hashes))
            t += rng.expovariate(1.0 / conv.think_time_s)
            length += o + user(len(out))
    out.sort(key=operator.attrgetter("arrival_time"))
    return iter(out)


@dataclass(frozen=True)
class _TenantDraw:
    """A tenant drawn for one request, with its own length samplers (None: the workload's)."""

    name: str
    priority: int
    prompt: Callable[[int], int] | None
    output: Callable[[int], int] | None


def _tenant_sampler(spec: WorkloadSpec, base: Path, rows: list[TraceRequest] | None
                    ) -> Callable[[int], _TenantDraw] | None:
    """A function from request index to its tenant (drawn by share from its own random stream), or
    None without tenant classes (a replayed row then keeps its own tenant and priority)."""
    if not spec.tenants:
        return None
    draws = []
    for i, t in enumerate(spec.tenants):
        samplers = [None if length is None else _length_sampler(
            length, random.Random(f"{spec.seed}-{kind}-{t.name}"), base, f"{spec.name}.tenants[{i}].{kind}", rows)
            for kind, length in (("prompt_len", t.prompt_len), ("output_len", t.output_len))]
        draws.append(_TenantDraw(t.name, t.priority, *samplers))
    rng = random.Random(f"{spec.seed}-tenant")
    weights = list(itertools.accumulate(t.share for t in spec.tenants))
    return lambda i: rng.choices(draws, cum_weights=weights)[0]


def _requests(spec: WorkloadSpec, arrivals: Iterator[float], prompt: Callable[[int], int],
              output: Callable[[int], int], prefix: Callable[[], tuple[int | None, int]],
              rows: list[TraceRequest] | None, tenant: Callable[[int], _TenantDraw] | None = None,
              ) -> Iterator[TraceRequest]:
    duration = math.inf if spec.duration is None else spec.duration
    max_prompt, max_output = spec.max_prompt_len or math.inf, spec.max_output_len or math.inf
    for i, t in enumerate(arrivals):
        if t >= duration:
            return
        group, plen = prefix()
        who = None if tenant is None else tenant(i)
        p = prompt(i) if who is None or who.prompt is None else who.prompt(i)
        o = output(i) if who is None or who.output is None else who.output(i)
        if group is not None and p <= plen:
            p = plen + 1
        if p > max_prompt:
            p = max_prompt
        if o > max_output:
            o = max_output
        req = TraceRequest(f"req-{i:06d}", t, p, o, None, None, group, plen,
                           *(("", 0) if who is None else (who.name, who.priority)))
        yield req if rows is None else _from_row(rows[i], req)


# --- token ids and summary ----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _all_ids(vocab_size: int) -> list[int]:
    return list(range(vocab_size))


def _extend_run(out: list[int], start: int, n: int, vocab_size: int) -> list[int]:
    """Append n consecutive ids from `start` to `out`, wrapping around vocab_size: slices of one list
    of every id, so no per-token loop and no new int objects."""
    ids = _all_ids(vocab_size)
    start %= vocab_size
    if start + n <= vocab_size:
        out += ids[start:start + n]
        return out
    out += ids[start:]
    full, rest = divmod(n - (vocab_size - start), vocab_size)
    for _ in range(full):
        out += ids
    out += ids[:rest]
    return out


def _extend_headed_run(out: list[int], key: int, n: int, vocab_size: int, space: int) -> list[int]:
    """Append n ids for `key`: a first id in [0, space) (distinct for keys distinct mod space), then a run
    whose start also depends on key // space, so keys < space * vocab_size differ in their first two ids."""
    if n <= 0:
        return out
    mult = 7919 if math.gcd(7919, space) == 1 else 1
    first = (key * mult + 1) % space
    out.append(first)
    return _extend_run(out, first + 1 + key // space, n - 1, vocab_size)


def prompt_token_ids(req: TraceRequest, vocab_size: int, index: int, *, hash_block_size: int = 512) -> list[int]:
    """Deterministic prompt ids in [0, vocab_size), prompt_len of them; the trace's ids if present.

    Otherwise synthetic (slices of one list of every id, ~6 us per 1,000 tokens). The top R = max(1, min(4096,
    vocab_size // 8)) ids are reserved as first ids of group prefixes: group g's prefix is the run of
    `prefix_len` ids starting at vocab_size - R + g % R, so requests of one group share their first
    `prefix_len` ids and groups < R differ in their first id. The rest of the prompt (all of it when
    ungrouped) starts with an id in [0, vocab_size - R) derived from `index`, so requests with distinct
    indices < vocab_size - R share no id at its first position (and for any indices < ~vocab_size^2, no
    leading block of >= 2 tokens). With Mooncake `block_hash_ids` (and no real ids) the prompt is
    built block by block, each `hash_block_size`-token block derived from its hash id, so equal hash ids
    give equal blocks; tokens beyond the hashed blocks come from `index`.
    """
    if vocab_size < 2:
        raise WorkloadError(f"vocab_size: must be >= 2, got {vocab_size}")
    if req.prompt_token_ids is not None:
        ids = req.prompt_token_ids
        if min(ids) < 0 or max(ids) >= vocab_size:
            raise WorkloadError(f"{req.request_id}: prompt_token_ids: ids must be in [0, {vocab_size})")
        return list(ids)
    reserved = max(1, min(4096, vocab_size // 8))
    space = vocab_size - reserved
    n = req.prompt_len
    ids: list[int] = []
    if req.block_hash_ids is not None:
        for h in req.block_hash_ids:
            _extend_headed_run(ids, h, min(hash_block_size, n - len(ids)), vocab_size, space)
    elif req.prefix_group is not None and req.prefix_len:
        _extend_run(ids, space + req.prefix_group % reserved, min(req.prefix_len, n), vocab_size)
    return _extend_headed_run(ids, index, n - len(ids), vocab_size, space)


def summarize(requests: Iterable[TraceRequest]) -> dict[str, float | int | None]:
    """count, duration (last - first arrival, s), mean_rate ((count - 1) / duration, req/s; None if
    duration is 0), and mean/median/max of prompt_len and output_len (None for no requests)."""
    reqs = list(requests)
    out: dict[str, float | int | None] = {"count": len(reqs)}
    duration = reqs[-1].arrival_time - reqs[0].arrival_time if reqs else None
    out["duration"] = duration
    out["mean_rate"] = (len(reqs) - 1) / duration if duration else None
    for name in ("prompt_len", "output_len"):
        values = [getattr(r, name) for r in reqs]
        out[f"{name}_mean"] = statistics.fmean(values) if values else None
        out[f"{name}_median"] = statistics.median(values) if values else None
        out[f"{name}_max"] = max(values) if values else None
    return out
