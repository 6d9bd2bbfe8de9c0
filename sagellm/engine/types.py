"""The engine's public request and output types (plain data)."""

from __future__ import annotations

import itertools
import queue
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sagellm.core.request import Request
from sagellm.core.sampling import SamplingParams
from sagellm.errors import RequestError, show
from sagellm.graph.batch import BatchShape
from sagellm.metrics.records import RequestRecord


@dataclass(frozen=True)
class StepTiming:
    """One step of the engine loop as `SageLLMEngine.start_step_log` records it: the batch's
    shape, the executor's wall seconds for it, the monotonic time it ended (`time.monotonic`, one
    clock for every process on the machine), and the worker that ran it (0 for an in-process
    engine; the worker index in a `ClusterEngine`)."""

    batch: BatchShape
    seconds: float
    end_time: float
    worker: int = 0


@dataclass(frozen=True)
class GenerateRequest:
    """One generation request.

    Give exactly one of `prompt` (text), `prompt_token_ids`, or `messages` (chat turns, rendered
    with the model's chat template). `request_id` defaults to a fresh UUID. `tenant` and
    `priority` (lower is served first) are read by the scheduling policy. Every field is validated
    on construction (`RequestError`, a ValueError, naming the field).
    """

    prompt: str | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    messages: tuple[dict, ...] | None = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    tenant: str = ""
    priority: int = 0

    def __post_init__(self) -> None:
        given = [n for n in ("prompt", "prompt_token_ids", "messages") if getattr(self, n) is not None]
        if len(given) != 1:
            raise RequestError(f"give exactly one of prompt, prompt_token_ids, messages (got {given or 'none'})")
        if self.prompt is not None:
            _check_text(self.prompt, "prompt")
        if self.prompt_token_ids is not None:
            object.__setattr__(self, "prompt_token_ids", _token_ids(self.prompt_token_ids, "prompt_token_ids"))
            if not self.prompt_token_ids:
                raise RequestError("prompt_token_ids: must not be empty")
        if self.messages is not None:
            object.__setattr__(self, "messages", _messages(self.messages))
        _check_text(self.request_id, "request_id")
        if not isinstance(self.tenant, str):
            raise RequestError(f"tenant: must be a string, got {show(self.tenant)}")
        _check_text(self.tenant, "tenant", allow_empty=True)
        stop = () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)):
            raise RequestError(f"stop: must be a string or a list of strings, got {show(self.stop)}")
        for s in stop:
            _check_text(s, "stop")
        object.__setattr__(self, "stop", tuple(stop))
        stop_ids = () if self.stop_token_ids is None else self.stop_token_ids
        object.__setattr__(self, "stop_token_ids", _token_ids(stop_ids, "stop_token_ids"))
        if not isinstance(self.priority, int) or isinstance(self.priority, bool) or abs(self.priority) >= 2**63:
            raise RequestError(f"priority: must be an integer in (-2**63, 2**63), lower served first, "
                               f"got {show(self.priority)}")
        for name in ("max_new_tokens", "top_k", "seed"):
            if isinstance(getattr(self, name), bool):
                raise RequestError(f"{name}: must be an integer, got {getattr(self, name)}")
        if not isinstance(self.ignore_eos, bool):
            raise RequestError(f"ignore_eos: must be true or false, got {show(self.ignore_eos)}")
        self.sampling_params()

    def sampling_params(self) -> SamplingParams:
        try:
            return SamplingParams(
                max_new_tokens=self.max_new_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=self.top_k,
                seed=self.seed,
                stop=self.stop,
                stop_token_ids=self.stop_token_ids,
                ignore_eos=self.ignore_eos,
            )
        except ValueError as exc:  # SamplingParams names the field: "<field> must be ..."
            field_name, _, rest = str(exc).partition(" ")
            raise RequestError(f"{field_name}: {rest}") from None


# A request's text fields are bounded only by the context window; ids beyond this are refused
# before a tuple of them is built.
MAX_TOKEN_IDS = 1 << 22


def _check_text(value: object, name: str, allow_empty: bool = False) -> None:
    """RequestError naming `name` unless `value` is a (non-empty) string that is valid Unicode text."""
    if not isinstance(value, str) or (not value and not allow_empty):
        raise RequestError(f"{name}: must be a non-empty string, got {show(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RequestError(f"{name}: not valid Unicode text ({exc.reason} at character {exc.start})") from None


def _token_ids(value: object, name: str) -> tuple[int, ...]:
    """`value` as a tuple of non-negative int token ids (bools are not ids); RequestError naming `name`."""
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
        raise RequestError(f"{name}: must be a list of non-negative integers, got {show(value)}")
    ids = tuple(itertools.islice(value, MAX_TOKEN_IDS + 1))
    if len(ids) > MAX_TOKEN_IDS:
        raise RequestError(f"{name}: more than {MAX_TOKEN_IDS} ids")
    for t in ids:
        if not isinstance(t, int) or isinstance(t, bool) or t < 0:
            raise RequestError(f"{name}: must be non-negative integers, got {show(t)}")
    return ids


def _messages(value: object) -> tuple[dict, ...]:
    """Chat turns as a tuple of {'role': str, 'content': str} dicts; RequestError naming the turn."""
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, (list, tuple)):
        raise RequestError("messages: must be a list of {'role': str, 'content': str} dicts")
    if not value:
        raise RequestError("messages: must not be empty")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RequestError(f"messages[{i}]: must be a dict with string 'role' and 'content', got {show(m)}")
        _check_text(m["role"], f"messages[{i}].role")
        _check_text(m["content"], f"messages[{i}].content", allow_empty=True)
    return tuple(value)


@dataclass(frozen=True)
class RequestMetrics:
    """Per-request latencies in seconds: queueing (arrival to first schedule), TTFT (arrival to
    first token), TPOT (mean time between output tokens after the first), end-to-end, and the
    inter-token latencies."""

    arrival_time: float
    queue_time: float | None
    ttft: float | None
    tpot: float | None
    e2e_latency: float | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_preemptions: int
    inter_token_latencies: tuple[float, ...] = ()

    @classmethod
    def from_request(cls, req: Request) -> RequestMetrics:
        t = req.token_times
        itl = tuple(b - a for a, b in zip(t, t[1:]))
        return cls(
            arrival_time=req.arrival_time,
            queue_time=None if req.first_scheduled_time is None else req.first_scheduled_time - req.arrival_time,
            ttft=None if req.first_token_time is None else req.first_token_time - req.arrival_time,
            tpot=(t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else None,
            e2e_latency=None if req.finish_time is None else req.finish_time - req.arrival_time,
            num_prompt_tokens=req.num_prompt_tokens,
            num_output_tokens=req.num_output_tokens,
            num_preemptions=req.num_preemptions,
            inter_token_latencies=itl,
        )


@dataclass(frozen=True)
class GenerateOutput:
    """A finished request: generated `text` and `token_ids` (eos included when it ended the
    request), `finish_reason` "stop", "length", "abort" or "error" (then `error` says why), or
    "prefilled" from a prefill-only engine (`scheduler.inference_mode: prefill_only`: the first
    token is sampled and the request continues on a decode worker)."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    prompt_token_ids: tuple[int, ...]
    metrics: RequestMetrics | None
    error: str | None = None
    record: RequestRecord | None = None  # the same per-request schema the simulator writes

    @property
    def throughput_tokens_per_s(self) -> float | None:
        m = self.metrics
        if m is None or not m.e2e_latency:
            return None
        return m.num_output_tokens / m.e2e_latency


@dataclass(frozen=True)
class StreamDelta:
    """A piece of a streamed generation: new text and token ids since the previous delta; the
    last delta has `finished` true and carries the full `output`."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finished: bool = False
    output: GenerateOutput | None = None


def rejected_output(request: GenerateRequest, message: str, reason: str = "error") -> GenerateOutput:
    """The output of a request that ended before it produced anything: `reason` "error" or
    "abort", `message` saying why."""
    return GenerateOutput(request.request_id, "", (), reason, tuple(request.prompt_token_ids or ()), None,
                          error=message)


def coerce_request(request: GenerateRequest | str, kwargs: dict[str, Any]) -> GenerateRequest:
    """A `GenerateRequest` from what a caller passed: a request, or a prompt string plus sampling
    keywords; ValueError otherwise."""
    if isinstance(request, str):
        return GenerateRequest(prompt=request, **kwargs)
    if kwargs:
        raise RequestError("keyword sampling options apply only to a plain-text prompt")
    if not isinstance(request, GenerateRequest):
        raise RequestError(f"request: must be a GenerateRequest or a prompt string, got {type(request).__name__}")
    return request


def collect_outputs(done: queue.Queue, request_ids: list[str], check_alive: Callable[[], None]
                    ) -> list[GenerateOutput]:
    """Wait for one output per id on `done` (any order); `check_alive` runs every second while
    waiting and raises if the engine has stopped. Returns them in the order of `request_ids`."""
    outputs: dict[str, GenerateOutput] = {}
    while len(outputs) < len(request_ids):
        try:
            out = done.get(timeout=1.0)
        except queue.Empty:
            check_alive()
            continue
        outputs[out.request_id] = out
    return [outputs[i] for i in request_ids]
