"""Request traces on disk: `TraceRequest`, and reading/writing JSONL and CSV trace files.

Formats (chosen by the file suffix):

* `.jsonl` -- one JSON object per line. Fields: `request_id` (optional), `arrival_time` in seconds
  (or `timestamp` in milliseconds, as in Mooncake traces), `prompt_len` (or `input_length`),
  `output_len` (or `output_length`), optional `prompt_token_ids`, `block_hash_ids` (or Mooncake's
  `hash_ids`), `prefix_group`, `prefix_len`, `tenant`, `priority`. Other fields are ignored.
* `.csv` -- a header line, then one row per request. Columns `arrival_time` (or `arrived_at`),
  `prompt_len` (or `num_prefill_tokens`), `output_len` (or `num_decode_tokens`), optional
  `request_id`, `prefix_group`, `prefix_len`, `tenant`, `priority`, and `prompt_token_ids` / `block_hash_ids` as
  space-separated integers. The Azure traces (microsoft/vidur's processed AzureLLMInferenceTrace2023)
  read as they are.

Reading is strict: a row with prompt_len < 1 or output_len < 1 is an error, not dropped or clamped
(the Azure conv and code traces contain no such rows, so nothing needs repairing). Every error is a
`WorkloadError` naming the file, the line and the field. `write_trace` then `read_trace` gives back
equal requests (floats are written with `repr`, which round-trips exactly).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sagellm.errors import InputError, show

# Tokens per entry of `hash_ids` in the Mooncake traces (FAST'25 release).
MOONCAKE_HASH_BLOCK_SIZE = 512
# No model has a context window of this many tokens; a longer prompt or output is a broken row.
MAX_LENGTH = 2**24

ARRIVAL_COLUMNS = ("arrival_time", "arrived_at")
PROMPT_COLUMNS = ("prompt_len", "num_prefill_tokens", "input_length")
OUTPUT_COLUMNS = ("output_len", "num_decode_tokens", "output_length")
HASH_COLUMNS = ("block_hash_ids", "hash_ids")
_REQUIRED = {"arrival_time": ARRIVAL_COLUMNS, "prompt_len": PROMPT_COLUMNS, "output_len": OUTPUT_COLUMNS}
_ALIASES = {alias: names[0] for names in (*_REQUIRED.values(), HASH_COLUMNS) for alias in names[1:]}
_OPTIONAL_CSV_COLUMNS = ("request_id", "prompt_token_ids", "block_hash_ids", "prefix_group", "prefix_len", "tenant",
                         "priority")
MAX_PRIORITY = 2**63


class WorkloadError(InputError):
    """Bad workload spec or trace file; the message names the field (e.g.
    'workload.arrival.rate: must be > 0, got -1') or the file, line and field."""


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a workload: when it arrives and how much work it is.

    `arrival_time` is in seconds from the start of the run and non-decreasing along a workload;
    the request prefills `prompt_len` >= 1 tokens and generates exactly `output_len` >= 1 tokens
    (ignore_eos). `prompt_token_ids` is set only when the trace carries real ids (then its length
    is `prompt_len`); `block_hash_ids` holds Mooncake per-block prefix hashes (one per
    `MOONCAKE_HASH_BLOCK_SIZE` tokens). `prefix_group`/`prefix_len`: the request's prompt starts
    with the `prefix_len`-token system prompt shared by all requests of that group. `tenant` and
    `priority` (lower is served first) are what the scheduling policy sees of who sent it.
    """

    request_id: str
    arrival_time: float
    prompt_len: int
    output_len: int
    prompt_token_ids: tuple[int, ...] | None = None
    block_hash_ids: tuple[int, ...] | None = None
    prefix_group: int | None = None
    prefix_len: int = 0
    tenant: str = ""
    priority: int = 0


def parse_int(value: Any, where: str) -> int:
    """`value` (an int, an integral float, or its text) as an int; WorkloadError naming `where` otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    raise WorkloadError(f"{where}: must be an integer, got {show(value)}")


def parse_float(value: Any, where: str) -> float:
    """`value` (a number or its text) as a finite float; WorkloadError naming `where` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise WorkloadError(f"{where}: must be a number, got {show(value)}")
    try:
        number = float(value)
    except ValueError:
        raise WorkloadError(f"{where}: must be a number, got {show(value)}") from None
    if not math.isfinite(number):
        raise WorkloadError(f"{where}: must be finite, got {show(value)}")
    return number


def _parse_ids(value: Any, where: str) -> tuple[int, ...] | None:
    """A list of non-negative ints (JSON list or space-separated text); None for missing or empty."""
    if value is None or value == "" or value == []:
        return None
    items = value.split() if isinstance(value, str) else value
    if not isinstance(items, list):
        raise WorkloadError(f"{where}: must be a list of integers, got {show(value)}")
    ids = tuple(parse_int(item, where) for item in items)
    if min(ids) < 0:
        raise WorkloadError(f"{where}: ids must be >= 0, got {min(ids)}")
    return ids


def check_request(req: TraceRequest, where: str) -> None:
    """Raise WorkloadError (prefixed with `where`) unless `req` satisfies the TraceRequest contract."""
    if not req.request_id:
        raise WorkloadError(f"{where}: request_id: must be non-empty")
    if not (math.isfinite(req.arrival_time) and req.arrival_time >= 0):
        raise WorkloadError(f"{where}: arrival_time: must be finite and >= 0, got {req.arrival_time}")
    for name in ("prompt_len", "output_len"):
        if not 1 <= getattr(req, name) <= MAX_LENGTH:
            raise WorkloadError(f"{where}: {name}: must be in [1, {MAX_LENGTH}], got {getattr(req, name)}")
    if req.prompt_token_ids is not None and len(req.prompt_token_ids) != req.prompt_len:
        raise WorkloadError(
            f"{where}: prompt_token_ids: has {len(req.prompt_token_ids)} ids but prompt_len is {req.prompt_len}"
        )
    if req.block_hash_ids is not None and not req.block_hash_ids:
        raise WorkloadError(f"{where}: block_hash_ids: must be non-empty or null")
    if req.prefix_group is not None and req.prefix_group < 0:
        raise WorkloadError(f"{where}: prefix_group: must be >= 0 or null, got {req.prefix_group}")
    if not -MAX_PRIORITY < req.priority < MAX_PRIORITY:
        raise WorkloadError(f"{where}: priority: must be in (-2**63, 2**63), got {req.priority}")
    if not 0 <= req.prefix_len <= req.prompt_len:
        raise WorkloadError(f"{where}: prefix_len: must be in [0, prompt_len={req.prompt_len}], got {req.prefix_len}")


def _canonical(obj: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON object with alias keys renamed to canonical ones (canonical keys win over aliases)."""
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = _ALIASES.get(key, key)
        if key == name or name not in out:
            out[name] = value
    return out


def _request_from_fields(fields: Mapping[str, Any], index: int, where: str) -> TraceRequest:
    """Build and check one request from a canonical JSON object or CSV row ('' counts as missing);
    without an arrival_time, Mooncake's `timestamp` (ms) gives it in seconds."""
    if fields.get("arrival_time") in (None, "") and fields.get("timestamp") not in (None, ""):
        fields = {**fields, "arrival_time": parse_float(fields["timestamp"], f"{where}: timestamp") / 1000.0}
    for name in ("arrival_time", "prompt_len", "output_len"):
        if fields.get(name) in (None, ""):
            raise WorkloadError(f"{where}: missing field {' or '.join(map(repr, _REQUIRED[name]))}")
    request_id, group, prefix_len = fields.get("request_id"), fields.get("prefix_group"), fields.get("prefix_len")
    tenant, priority = fields.get("tenant"), fields.get("priority")
    if tenant is not None and not isinstance(tenant, (str, int)):
        raise WorkloadError(f"{where}: tenant: must be a string, got {show(tenant)}")
    req = TraceRequest(
        request_id=str(request_id) if request_id not in (None, "") else f"req-{index:06d}",
        arrival_time=parse_float(fields["arrival_time"], f"{where}: arrival_time"),
        prompt_len=parse_int(fields["prompt_len"], f"{where}: prompt_len"),
        output_len=parse_int(fields["output_len"], f"{where}: output_len"),
        prompt_token_ids=_parse_ids(fields.get("prompt_token_ids"), f"{where}: prompt_token_ids"),
        block_hash_ids=_parse_ids(fields.get("block_hash_ids"), f"{where}: block_hash_ids"),
        prefix_group=None if group in (None, "") else parse_int(group, f"{where}: prefix_group"),
        prefix_len=0 if prefix_len in (None, "") else parse_int(prefix_len, f"{where}: prefix_len"),
        tenant="" if tenant is None else str(tenant),
        priority=0 if priority in (None, "") else parse_int(priority, f"{where}: priority"),
    )
    check_request(req, where)
    return req


def _check_order(requests: Sequence[TraceRequest], wheres: Sequence[str]) -> None:
    """Arrival times must be non-decreasing and request ids unique."""
    seen: set[str] = set()
    for i, req in enumerate(requests):
        if i and req.arrival_time < requests[i - 1].arrival_time:
            raise WorkloadError(
                f"{wheres[i]}: arrival_time: {req.arrival_time} is before the previous request's "
                f"{requests[i - 1].arrival_time} (traces must be sorted by arrival)"
            )
        if req.request_id in seen:
            raise WorkloadError(f"{wheres[i]}: request_id: duplicate {show(req.request_id)}")
        seen.add(req.request_id)


@contextlib.contextmanager
def _unreadable_as_error(path: Path) -> Iterator[None]:
    """Turn what the file itself makes the readers raise (not text, a CSV field beyond the csv
    module's limit, a number too long to convert) into a WorkloadError naming the file."""
    try:
        yield
    except UnicodeDecodeError as exc:
        raise WorkloadError(f"{path}: not UTF-8 text (byte {exc.start}); give a .csv or .jsonl trace") from None
    except (csv.Error, RecursionError, OverflowError) as exc:
        raise WorkloadError(f"{path}: unreadable trace: {show(str(exc))}") from None
    except ValueError as exc:
        if isinstance(exc, WorkloadError):
            raise
        raise WorkloadError(f"{path}: unreadable trace: {show(str(exc))}") from None


def _open_trace(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix not in (".jsonl", ".csv"):
        raise WorkloadError(f"{path}: unsupported trace format {show(path.suffix)} (use .jsonl or .csv)")
    if not path.is_file():
        raise WorkloadError(f"{path}: no such trace file")
    return path


def _csv_header(path: Path, header: list[str] | None) -> list[str]:
    """The canonical column names of a CSV header; WorkloadError for no header, a duplicate or a missing column."""
    if header is None:
        raise WorkloadError(f"{path}: empty trace (no header line)")
    columns = [_ALIASES.get(h, h) for h in header]
    for name in columns:
        if columns.count(name) > 1:
            raise WorkloadError(f"{path}: line 1: column {show(name)} given twice (under an alias); columns: {header}")
    for name, names in _REQUIRED.items():
        if name not in columns:
            raise WorkloadError(f"{path}: line 1: missing column {' or '.join(map(repr, names))}; columns: {header}")
    return columns


def _iter_csv_rows(path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """(where, row keyed by canonical column) for each data row of a CSV file."""
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        columns = _csv_header(path, header)
        for row in reader:
            if not row:
                continue
            if len(row) != len(columns):
                raise WorkloadError(f"{path}: line {reader.line_num}: expected {len(columns)} fields, got {len(row)}")
            yield f"{path}: line {reader.line_num}", dict(zip(columns, row))


def _iter_jsonl_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, object) for each non-blank line of a JSONL file."""
    with path.open() as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}: line {number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise WorkloadError(f"{where}: invalid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise WorkloadError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield where, obj


def read_trace(path: str | Path) -> list[TraceRequest]:
    """All requests of a `.jsonl` or `.csv` trace, in file order (see the module docstring for the
    fields). Raises WorkloadError naming the file, line and field for a missing file, an empty
    trace, a missing column, a non-numeric value, a length < 1, or unsorted arrival times."""
    path = _open_trace(path)
    rows = _iter_csv_rows(path) if path.suffix == ".csv" else ((w, _canonical(o)) for w, o in _iter_jsonl_rows(path))
    requests: list[TraceRequest] = []
    wheres: list[str] = []
    with _unreadable_as_error(path):
        for where, fields in rows:
            requests.append(_request_from_fields(fields, len(requests), where))
            wheres.append(where)
    if not requests:
        raise WorkloadError(f"{path}: empty trace (no rows)")
    _check_order(requests, wheres)
    return requests


def _length(value: Any, where: str) -> int:
    number = parse_int(value, where)
    if not 1 <= number <= MAX_LENGTH:
        raise WorkloadError(f"{where}: must be in [1, {MAX_LENGTH}], got {number}")
    return number


def _csv_lengths(path: Path, columns: Sequence[str]) -> list[int]:
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise WorkloadError(f"{path}: empty trace (no header line)")
        name = next((c for c in columns if c in header), None)
        if name is None:
            raise WorkloadError(f"{path}: line 1: missing column {' or '.join(map(repr, columns))}; columns: {header}")
        col, values = header.index(name), []
        for row in reader:
            try:
                value = int(row[col])
            except (ValueError, IndexError):
                value = _length(row[col] if col < len(row) else None, f"{path}: line {reader.line_num}: {name}")
            if not 1 <= value <= MAX_LENGTH:
                raise WorkloadError(
                    f"{path}: line {reader.line_num}: {name}: must be in [1, {MAX_LENGTH}], got {value}")
            values.append(value)
    return values


def _jsonl_lengths(path: Path, columns: Sequence[str]) -> list[int]:
    values = []
    for where, obj in _iter_jsonl_rows(path):
        name = next((c for c in columns if obj.get(c) is not None), None)
        if name is None:
            raise WorkloadError(f"{where}: missing field {' or '.join(map(repr, columns))}")
        values.append(_length(obj[name], f"{where}: {name}"))
    return values


def read_lengths(path: str | Path, columns: Sequence[str]) -> list[int]:
    """The integer values (each >= 1) of the first of the raw `columns` present in a trace, in file
    order, for empirical length distributions. WorkloadError naming file, line and column otherwise."""
    path = _open_trace(path)
    with _unreadable_as_error(path):
        values = _csv_lengths(path, columns) if path.suffix == ".csv" else _jsonl_lengths(path, columns)
    if not values:
        raise WorkloadError(f"{path}: empty trace (no rows)")
    return values


def _record(req: TraceRequest) -> dict[str, Any]:
    """The JSON object of one request: the four base fields, optional ones only when set."""
    rec: dict[str, Any] = {
        "request_id": req.request_id,
        "arrival_time": float(req.arrival_time),
        "prompt_len": req.prompt_len,
        "output_len": req.output_len,
    }
    if req.prompt_token_ids is not None:
        rec["prompt_token_ids"] = list(req.prompt_token_ids)
    if req.block_hash_ids is not None:
        rec["block_hash_ids"] = list(req.block_hash_ids)
    if req.prefix_group is not None:
        rec["prefix_group"] = req.prefix_group
    if req.prefix_len:
        rec["prefix_len"] = req.prefix_len
    if req.tenant:
        rec["tenant"] = req.tenant
    if req.priority:
        rec["priority"] = req.priority
    return rec


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return " ".join(map(str, value))
    return repr(value) if isinstance(value, float) else str(value)


def write_trace(path: str | Path, requests: Iterable[TraceRequest]) -> None:
    """Write `requests` to a `.jsonl` or `.csv` file that `read_trace` reads back equal. Raises
    WorkloadError for an unknown suffix, no requests, or requests breaking the TraceRequest contract."""
    path = Path(path)
    if path.suffix not in (".jsonl", ".csv"):
        raise WorkloadError(f"{path}: unsupported trace format {show(path.suffix)} (use .jsonl or .csv)")
    reqs = list(requests)
    if not reqs:
        raise WorkloadError(f"{path}: no requests to write")
    wheres = [f"{path}: request {i}" for i in range(len(reqs))]
    for req, where in zip(reqs, wheres):
        check_request(req, where)
    _check_order(reqs, wheres)
    records = [_record(req) for req in reqs]
    with path.open("w", newline="") as f:
        if path.suffix == ".jsonl":
            f.writelines(json.dumps(rec) + "\n" for rec in records)
            return
        base = ["request_id", "arrival_time", "prompt_len", "output_len"]
        columns = base + [c for c in _OPTIONAL_CSV_COLUMNS[1:] if any(c in rec for rec in records)]
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows([_csv_cell(rec.get(c)) for c in columns] for rec in records)
