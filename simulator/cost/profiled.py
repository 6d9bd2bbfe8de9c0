"""Profiled cost model: step time fitted to the live engine's measured steps on this machine.

Model, with non-negative coefficients fitted by least squares on relative error:

    step_time = g(num_tokens)                      token-parallel work: projections, MLP, norms
              + c_head * LM-head FLOPs              rows that sample
              + c_attn * attention FLOPs            causal (query, key) pairs
              + c_kv   * KV bytes read              each request's context
              + c_pf * prefill chunks + c_dec * decodes   per-request work outside the kernels

`g` is piecewise linear in the number of tokens, with knots at KNOTS (every count from 1 to 16,
then 32, 64, 128, 256, 512) and proportional to tokens beyond the last. A linear `g` was
tried first: on the Intel Xeon a GEMM over one to three rows costs about the same, four rows cost
about 60% more (the BLAS library switches kernels), and the cost per row falls again up to tens of
rows. A line cannot follow that, and it left 6% median error. On the AMD EPYC the cost is jagged
row by row: 7, 9 and 11 rows take 15-35% longer than 8 or 12, so below 17 rows every count is a
knot (and the calibration grid times every count). A profile keeps the knots it was fitted with
(its `features`), so profiles fitted with other knots still load (see docs/simulator.md). The other terms come from the
execution graph (`sagellm.graph`), so they scale with the work they name. `step_time` multiplies
the fitted time by a serving factor measured on steps of a live run (see `ProfiledCostModel`).

A profile is two files in `simulator/hardware/profiles/`: `<id>.csv` (the samples) and
`<id>.json` (machine and model identity, dtype, coefficients, held-out error).
"""

from __future__ import annotations

import json
import random
import statistics
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sagellm.config import ConfigError
from sagellm.core.outputs import SchedulerOutput
from sagellm.graph import BatchShape, step_operators
from sagellm.graph.batch import batch_vector
from sagellm.models.shape import ModelShape
from simulator.cost.machine import model_key

KNOTS = (*range(1, 17), 32, 64, 128, 256, 512)
OTHER_FEATURES = ("lm_head_flops", "attention_flops", "kv_bytes", "prefill_chunks", "decodes")


def feature_names(knots: tuple[int, ...] = KNOTS) -> tuple[str, ...]:
    """The regressors' names, as a profile's `features` lists them: one per knot, then the rest."""
    return (*(f"tokens_{k}" for k in knots), *OTHER_FEATURES)


def _increasing_knots(knots: tuple[int, ...]) -> bool:
    return bool(knots) and knots[0] >= 1 and all(a < b for a, b in zip(knots, knots[1:]))


def knots_of(names: list[str]) -> tuple[int, ...]:
    """The knots of a profile's `features` list; ValueError when it is not `feature_names(knots)`
    for increasing positive knots."""
    try:
        knots = tuple(int(n.removeprefix("tokens_")) for n in names[:len(names) - len(OTHER_FEATURES)])
    except ValueError:
        knots = ()
    if not _increasing_knots(knots) or tuple(names) != feature_names(knots):
        raise ValueError(f"features must be tokens_<k> for increasing knots k >= 1, then {list(OTHER_FEATURES)}; "
                         f"got {list(names)}")
    return knots


FEATURES = feature_names(KNOTS)
_BATCH_FIELDS = ("num_tokens", "num_seqs", "num_decodes", "num_sampled", "attention_pairs", "kv_context_tokens")
# Serving steps are told apart by kind for the serving factor: only decodes, or some prompt chunk.
SERVING_KINDS = ("decode", "prefill")
MIN_KIND_STEPS = 20
# Decode steps are told apart further by their number of rows (inclusive bands; None: no upper
# bound). The grid's time of a decode step is not off from serving by the same amount at every row
# count: on the AMD EPYC, decode steps of 4-5 rows ran 8-10% faster relative to the grid than
# steps of 1-3 or 6-8 rows while serving, in every run of the 2026-12-07 06:24 UTC load sweep (two threads).
DECODE_BANDS: tuple[tuple[int, int | None], ...] = ((1, 1), (2, 2), (3, 3), (4, 5), (6, 8), (9, 16), (17, None))


def _band_key(lo: int, hi: int | None) -> str:
    return f"decode_rows_{lo}" if lo == hi else f"decode_rows_{lo}+" if hi is None else f"decode_rows_{lo}-{hi}"


BAND_KEYS = tuple(_band_key(lo, hi) for lo, hi in DECODE_BANDS)


def decode_band(num_seqs: int) -> str:
    """The `BAND_KEYS` entry of a decode step of `num_seqs` rows (>= 1)."""
    for (lo, hi), key in zip(DECODE_BANDS, BAND_KEYS):
        if num_seqs >= lo and (hi is None or num_seqs <= hi):
            return key
    raise ValueError(f"a decode step has at least one row, got {num_seqs}")


def _check_kind_factors(factors: dict[str, float], where: str) -> None:
    keys = set(factors)
    if (not {"all", *SERVING_KINDS} <= keys or not keys <= {"all", *SERVING_KINDS, *BAND_KEYS}
            or not all(f > 0 for f in factors.values())):
        raise ValueError(f"{where}: needs factors > 0 for 'all' and {SERVING_KINDS}, and optionally for decode "
                         f"row bands {BAND_KEYS}; got {factors}")


def serving_kind(num_seqs: int, num_decodes: int) -> str:
    """"decode" when every row of the step is a decode, else "prefill"."""
    return "decode" if num_seqs == num_decodes else "prefill"


def serving_factor_of(factors: dict[str, float], num_seqs: int, num_decodes: int) -> float:
    """The factor in `factors` (kinds, and optional decode row bands) that prices a step of
    `num_seqs` rows of which `num_decodes` decode: its row band's for a decode step when
    `factors` has one, else its kind's."""
    if num_seqs == num_decodes:
        return factors.get(decode_band(num_seqs), factors["decode"])
    return factors["prefill"]


def token_basis(num_tokens: int, knots: tuple[int, ...] = KNOTS) -> list[float]:
    """Piecewise-linear (hat) basis over `knots` at `num_tokens`; the last one keeps rising linearly
    past the last knot (time proportional to tokens), and everything is 0 at 0 tokens."""
    basis = [0.0] * len(knots)
    t = num_tokens
    if t <= 0:
        return basis
    if t <= knots[0]:
        basis[0] = t / knots[0]
        return basis
    if t >= knots[-1]:
        basis[-1] = t / knots[-1]
        return basis
    j = bisect_right(knots, t) - 1
    lo, hi = knots[j], knots[j + 1]
    w = (t - lo) / (hi - lo)
    basis[j], basis[j + 1] = 1.0 - w, w
    return basis


def features(shape: ModelShape, dtype: str, batch: BatchShape, knots: tuple[int, ...] = KNOTS) -> list[float]:
    """The model's regressors for one batch (see module docstring), with the token basis over `knots`."""
    head = attn_flops = kv_bytes = 0.0
    for o in step_operators(shape, batch, dtype):
        if o.name == "lm_head":
            head += o.total_flops
        elif o.kind == "attention":
            attn_flops += o.total_flops
            kv_bytes += o.total_bytes
    return [*token_basis(batch.num_tokens, knots), head, attn_flops, kv_bytes,
            float(batch.num_seqs - batch.num_decodes), float(batch.num_decodes)]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


@dataclass(frozen=True)
class FitReport:
    """Relative errors |pred - measured| / measured of a fit on grid samples it did not see (each
    the median of repeated timings), and the median error on single steps timed during live serving
    (never fitted), whose own noise and the machine's drift (several %) set a floor under it."""

    num_train: int
    num_heldout: int
    median_error: float
    p90_error: float
    max_error: float
    in_situ_heldout: int = 0
    in_situ_median_error: float = float("nan")


class ProfiledCostModel:
    """Step time = coefficients . features (see the module docstring) x a serving factor.

    `predict(batch)` is a step as the grid measured it, alone; `step_time(out)` is a step inside the
    serving loop: the grid time scaled by the serving factor of its kind (of a decode step, its row
    band's when there is one, `DECODE_BANDS`), the ratio of total
    measured to total predicted time over the calibration's live serving steps of that kind
    (`SERVING_KINDS`: "decode" for steps of decodes only, "prefill" for steps with a prompt
    chunk). With the scheduler, the asyncio front end and other requests' memory around them, steps
    run a few % slower than alone, and not by the same amount for each kind (here about 3% for
    decode steps and 7% for steps with a prompt chunk). `serving_factor` is the ratio over all
    in-situ steps, the factor of a kind with fewer than `MIN_KIND_STEPS` of them, and the only one
    of profiles fitted before the kinds were told apart. `scale(f)` multiplies every factor (the
    machine's speed now vs at calibration). `mode_serving_factors` holds factors of the same kinds
    timed in situ under another schedule mode ("time_share", "strict"), where other work shares
    the machine differently (a STRICT decode worker runs beside a prefill worker); `use_mode(mode)`
    makes them the ones `step_time` uses, and leaves the others when the profile has none for it.

    `transfer_time` uses `kv_links`, the latency and bandwidth measured for each direction
    ("hbm->ddr", "nvme->hbm", ...) by timing the engine's own KV copies
    (`sagellm.engine.kv_calibration`), and the prefill-to-decode hand-off ("hbm->peer" block-wise,
    "hbm->peer_layer" per layer piece, `sagellm.engine.pd_calibration`; without the second, the
    first), times the link's `serving_factor` when it has one (hand-offs timed during serving vs
    alone); for a direction it lacks, `copy_bandwidth` and `copy_latency`.
    """

    def __init__(self, shape: ModelShape, dtype: str, coefficients: list[float], meta: dict[str, Any] | None = None,
                 copy_bandwidth: float = 10e9, copy_latency: float = 0.0, serving_factor: float = 1.0,
                 serving_factors: dict[str, float] | None = None, knots: tuple[int, ...] = KNOTS) -> None:
        if not _increasing_knots(tuple(knots)):
            raise ValueError(f"knots must be increasing and >= 1, got {knots}")
        names = feature_names(tuple(knots))
        if len(coefficients) != len(names):
            raise ValueError(f"expected {len(names)} coefficients {names}, got {len(coefficients)}")
        self.knots = tuple(knots)
        self.shape, self.dtype = shape, dtype
        self.coefficients = [float(c) for c in coefficients]
        self.meta = meta or {}
        self.copy_bandwidth, self.copy_latency = copy_bandwidth, copy_latency
        self.kv_links: dict[str, dict[str, float]] = dict(self.meta.get("kv_links") or {})
        factors = {kind: serving_factor for kind in SERVING_KINDS} | dict(serving_factors or {})
        if not set(factors) <= {*SERVING_KINDS, *BAND_KEYS}:
            raise ValueError(f"serving_factors: keys are the kinds {SERVING_KINDS} and decode row bands "
                             f"{BAND_KEYS}, got {sorted(factors)}")
        for kind, f in {"all": serving_factor, **factors}.items():
            if not f > 0:
                raise ValueError(f"serving factor ({kind}) must be > 0, got {f}")
        self.serving_factor = serving_factor
        self.serving_factors = factors
        self.mode_serving_factors: dict[str, dict[str, float]] = {
            mode: {kind: float(f) for kind, f in kinds.items()}
            for mode, kinds in (self.meta.get("serving_factors_by_mode") or {}).items()}
        for mode, kinds in self.mode_serving_factors.items():
            _check_kind_factors(kinds, f"serving_factors_by_mode.{mode}")
        self.name = f"profiled({self.meta.get('id', model_key(shape))})"
        # The non-token features are linear in BatchShape: fold them into one weight per batch field.
        num_knots = len(self.knots)
        rest = [0.0] * num_knots + self.coefficients[num_knots:]
        self._token_values = self.coefficients[:num_knots]
        self._weights = []
        for j in range(len(_BATCH_FIELDS)):
            unit = [0] * len(_BATCH_FIELDS)
            unit[j] = 1
            f = features(shape, dtype, BatchShape(*unit), self.knots)
            f[:num_knots] = [0.0] * num_knots
            self._weights.append(_dot(rest, f))

    def token_time(self, num_tokens: int) -> float:
        """g(num_tokens): the fitted token-parallel time."""
        return _dot(self._token_values, token_basis(num_tokens, self.knots))

    def predict(self, batch: BatchShape) -> float:
        """The fitted time of `batch` as the calibration grid measured it: one step alone."""
        return _dot(self.coefficients, features(self.shape, self.dtype, batch, self.knots))

    def batch_time(self, batch: BatchShape) -> float:
        """`step_time` of a step whose shape is `batch`: the grid time x its kind's (or decode row
        band's) serving factor."""
        if not batch.num_seqs:
            return 0.0
        return self.predict(batch) * serving_factor_of(self.serving_factors, batch.num_seqs, batch.num_decodes)

    def speed_factor(self, samples: list[Any]) -> float:
        """How much slower (> 1) or faster the machine runs `samples` (calibration samples of a
        speed probe, timed now) than this profile predicts: sum measured / sum predicted."""
        predicted = sum(self.predict(s.batch) for s in samples)
        return sum(s.median_seconds for s in samples) / predicted

    def scale(self, factor: float) -> None:
        """Multiply every serving factor by `factor` (> 1: the machine runs slower than profiled)."""
        if not factor > 0:
            raise ValueError(f"speed factor must be > 0, got {factor}")
        self.serving_factor *= factor
        self.serving_factors = {kind: f * factor for kind, f in self.serving_factors.items()}

    def use_mode(self, mode: str) -> None:
        """Price serving steps with the factors timed in situ under schedule mode `mode`, when the
        profile has them (else keep the default ones, timed on HYBRID replicas). Call before
        `scale`."""
        kinds = self.mode_serving_factors.get(mode)
        if kinds is not None:
            self.use_serving_factors(kinds, f"{mode} serving factors")

    def use_serving_factors(self, factors: dict[str, float], label: str = "serving factors measured now") -> None:
        """Price serving steps with `factors` ({"all", "decode", "prefill"} and optionally decode
        row bands `BAND_KEYS`: measured / grid time of steps timed while serving, e.g. an
        experiment's serving reference) in place of the profile's own serving factors; replaces any
        `use_mode` or `scale` before it. `label` goes into the model's name."""
        _check_kind_factors(factors, "serving factors")
        self.serving_factor = float(factors["all"])
        self.serving_factors = {key: float(f) for key, f in factors.items() if key != "all"}
        self.name = f"profiled({self.meta.get('id', model_key(self.shape))}, {label})"

    def use_link_serving_factor(self, name: str, factor: float) -> None:
        """Price KV link `name` (e.g. "hbm->peer") with serving factor `factor` (hand-offs timed
        while serving now, against the link's fit) in place of the profile's."""
        if name not in self.kv_links:
            raise ValueError(f"kv link {name!r}: the profile has no such link (it has {sorted(self.kv_links)})")
        if not factor > 0:
            raise ValueError(f"kv link {name!r}: serving factor must be > 0, got {factor}")
        self.kv_links[name] = {**self.kv_links[name], "serving_factor": float(factor)}

    def step_time(self, out: SchedulerOutput) -> float:
        if not out.request_ids:
            return 0.0
        x = batch_vector(out)
        t = self.token_time(x[0])
        for w, v in zip(self._weights, x):
            t += w * v
        return t * serving_factor_of(self.serving_factors, x[1], x[2])

    def transfer_time(self, num_bytes: int, src_tier: str, dst_tier: str) -> float:
        if num_bytes <= 0:
            return 0.0
        link = self.kv_links.get(f"{src_tier}->{dst_tier}")
        if link is None and dst_tier == "peer_layer":
            link = self.kv_links.get(f"{src_tier}->peer")  # a profile that timed one hand-off link
        if link is None:
            return self.copy_latency + num_bytes / self.copy_bandwidth
        return (link["latency"] + num_bytes / link["bandwidth"]) * link.get("serving_factor", 1.0)

    # ---- fitting ---------------------------------------------------------------------------------
    @classmethod
    def fit(cls, shape: ModelShape, dtype: str, batches: list[BatchShape], seconds: list[float],
            meta: dict[str, Any] | None = None, knots: tuple[int, ...] = KNOTS) -> ProfiledCostModel:
        """Non-negative least squares on relative error (rows scaled by 1 / measured time), with the
        token basis over `knots`."""
        import numpy as np
        from scipy.optimize import nnls

        need = 2 * len(feature_names(knots)) // 3
        if len(batches) != len(seconds) or len(batches) < need:
            raise ValueError(f"need at least {need} samples with times, got {len(batches)}")
        x = np.array([features(shape, dtype, b, knots) for b in batches], dtype=np.float64)
        y = np.array(seconds, dtype=np.float64)
        scale = x.max(axis=0)
        scale[scale == 0] = 1.0
        coef, _ = nnls((x / scale) / y[:, None], np.ones_like(y))
        return cls(shape, dtype, list(coef / scale), meta, knots=knots)

    @classmethod
    def fit_with_holdout(cls, shape: ModelShape, dtype: str, batches: list[BatchShape], seconds: list[float],
                         heldout_fraction: float = 0.25, seed: int = 0, meta: dict[str, Any] | None = None,
                         in_situ: list[bool] | None = None, probe: list[bool] | None = None,
                         knots: tuple[int, ...] = KNOTS) -> tuple[ProfiledCostModel, FitReport]:
        """Fit on a random (seeded) part of the grid samples, report errors on the rest, then refit on
        every grid sample. `in_situ` marks single steps timed during live serving: they are never
        fitted, only used to check the model on real serving steps (reported separately) and for the
        serving factors. `probe` marks speed-probe shapes timed around those serving steps (never
        fitted): the serving factors are then taken relative to the probe's speed at that time,
        as experiments scale the model by the probe's speed at theirs, so that the machine's drift
        between the grid and the serving steps does not enter the factors."""
        flags = in_situ or [False] * len(batches)
        probes = probe or [False] * len(batches)
        grid_idx = [i for i in range(len(batches)) if not flags[i] and not probes[i]]
        situ_idx = [i for i in range(len(batches)) if flags[i]]
        probe_idx = [i for i in range(len(batches)) if probes[i]]
        idx = list(grid_idx)
        random.Random(seed).shuffle(idx)
        k = max(1, round(len(idx) * heldout_fraction))
        test, train = idx[:k], idx[k:]
        model = cls.fit(shape, dtype, [batches[i] for i in train], [seconds[i] for i in train], knots=knots)

        def errors(which: list[int]) -> list[float]:
            return sorted(abs(model.predict(batches[i]) - seconds[i]) / seconds[i] for i in which)

        grid, situ = errors(test), errors(situ_idx)
        p90 = grid[min(len(grid) - 1, int(0.9 * len(grid)))]
        report = FitReport(len(train), len(grid), statistics.median(grid), p90, grid[-1], len(situ),
                           statistics.median(situ) if situ else float("nan"))
        final = cls.fit(shape, dtype, [batches[i] for i in grid_idx], [seconds[i] for i in grid_idx], meta, knots)
        if situ_idx:
            factors, speed = final.serving_factors_of([batches[i] for i in situ_idx], [seconds[i] for i in situ_idx],
                                                      [batches[i] for i in probe_idx], [seconds[i] for i in probe_idx])
            final.meta["in_situ_probe_speed"] = speed
            final.serving_factor = factors["all"]
            final.serving_factors = {key: f for key, f in factors.items() if key != "all"}
        return final, report

    def serving_factors_of(self, steps: list[BatchShape], step_seconds: list[float], probe: list[BatchShape],
                           probe_seconds: list[float]) -> tuple[dict[str, float], float]:
        """Serving factors from steps timed during live serving, relative to the speed probe timed
        around them: ({"all": f, "decode": f, "prefill": f, <decode row band>: f, ...}, probe
        speed). A kind with fewer than `MIN_KIND_STEPS` steps gets the factor of all steps; a decode
        row band (`BAND_KEYS`) has a factor only with at least `MIN_KIND_STEPS` steps in it (and
        then decode steps of its rows are priced by it, others by the decode factor). Each factor
        is measured / predicted time summed over the steps (of that kind or band), divided by the
        same ratio for the probe (1 without one), so that the machine's drift between the grid and
        the serving run does not enter it."""
        def ratio(batches: list[BatchShape], secs: list[float]) -> float:
            return sum(secs) / sum(self.predict(b) for b in batches)

        if not steps:
            raise ValueError("serving factors need at least one in-situ step")
        speed = ratio(probe, probe_seconds) if probe else 1.0
        factors = {"all": ratio(steps, step_seconds) / speed}
        groups: dict[str, list[int]] = {}
        for i, b in enumerate(steps):
            groups.setdefault(serving_kind(b.num_seqs, b.num_decodes), []).append(i)
            if b.num_seqs == b.num_decodes:
                groups.setdefault(decode_band(b.num_seqs), []).append(i)
        for key in (*SERVING_KINDS, *BAND_KEYS):
            of_group = groups.get(key, [])
            if len(of_group) >= MIN_KIND_STEPS:
                factors[key] = ratio([steps[i] for i in of_group], [step_seconds[i] for i in of_group]) / speed
            elif key in SERVING_KINDS:
                factors[key] = factors["all"]
        return factors, speed

    # ---- files -----------------------------------------------------------------------------------
    def save(self, path: Path, samples_csv: str) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".csv").write_text(samples_csv)
        doc = dict(self.meta)
        doc.update({
            "model_key": model_key(self.shape),
            "model_shape": _shape_dict(self.shape),
            "dtype": self.dtype,
            "features": list(feature_names(self.knots)),
            "coefficients": self.coefficients,
            "copy_bandwidth": self.copy_bandwidth,
            "copy_latency": self.copy_latency,
            "serving_factor": self.serving_factor,
            "serving_factors": self.serving_factors,
            "serving_factors_by_mode": self.mode_serving_factors,
            "kv_links": self.kv_links,
        })
        path.with_suffix(".json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Path) -> ProfiledCostModel:
        shape, dtype, doc = read_profile(path)
        try:
            return cls(shape, dtype, doc["coefficients"], doc, doc.get("copy_bandwidth", 10e9),
                       doc.get("copy_latency", 0.0), doc.get("serving_factor", 1.0), doc.get("serving_factors"),
                       knots_of(doc.get("features", FEATURES)))
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"hardware: calibrated profile {str(path)!r} does not fit this version's model "
                              f"({exc}); refit it with `sagellm calibrate --refit {path}`") from exc


def read_profile(path: Path) -> tuple[ModelShape, str, dict[str, Any]]:
    """(model shape, dtype, whole document) of a profile's JSON file."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
        from sagellm.models.shape import RopeScaling

        sd = dict(doc["model_shape"])
        if sd.get("rope_scaling"):
            sd["rope_scaling"] = RopeScaling(**sd["rope_scaling"])
        sd["eos_token_ids"] = tuple(sd.get("eos_token_ids", ()))
        return ModelShape(**sd), doc["dtype"], doc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"hardware: cannot read calibrated profile {str(path)!r}: {exc}") from exc


def _shape_dict(shape: ModelShape) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(shape)
