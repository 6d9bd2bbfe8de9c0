"""Roofline cost model: each operator of the step graph costs max(FLOPs / peak, bytes / bandwidth).

step_time = sum over operators of count * max(flops / peak, bytes / bandwidth) / efficiency
            + step_overhead

`explain(batch)` evaluates that sum operator by operator from `sagellm.graph`. `step_time` gives
the same number faster: every operator's FLOPs and bytes are affine in the six fields of
`BatchShape`, so the coefficients are extracted once from the graph, and operators whose FLOPs and
bytes both scale with the same single field (all elementwise ones) fold into one linear term.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sagellm.core.outputs import SchedulerOutput
from sagellm.graph import BatchShape, step_operators
from sagellm.graph.batch import batch_vector
from sagellm.models.shape import ModelShape
from simulator.hardware.spec import HardwareSpec

_NUM_FIELDS = 6


@dataclass(frozen=True)
class OperatorTime:
    """One row of `RooflineCostModel.explain`: an operator's time and which roof bounds it."""

    name: str
    count: int
    flops: float
    bytes: float
    seconds: float
    bound: str  # "compute" or "memory"


class RooflineCostModel:
    """Prices steps of `shape` in `dtype` on `spec` (see module docstring for the formula)."""

    def __init__(self, spec: HardwareSpec, shape: ModelShape, dtype: str) -> None:
        self.spec, self.shape, self.dtype = spec, shape, dtype
        self.peak = spec.peak(dtype)
        self.bandwidth = spec.memory_bandwidth
        self.name = f"roofline({spec.name}, {shape.name or shape.architecture}, {dtype})"
        # Two formulas: steps where some request samples (the LM head runs) and steps where none does.
        self._sampling_step = self._compile(*self._extract(1))
        self._silent_step = self._compile(*self._extract(0))

    # ---- reference: operator by operator ----------------------------------------------------
    def explain(self, batch: BatchShape) -> list[OperatorTime]:
        rows = []
        for op in step_operators(self.shape, batch, self.dtype):
            tc, tm = op.flops / self.peak, op.bytes / self.bandwidth
            seconds = op.count * max(tc, tm) / self.spec.efficiency
            rows.append(OperatorTime(op.name, op.count, op.flops, op.bytes, seconds,
                                     "compute" if tc >= tm else "memory"))
        return rows

    def batch_time(self, batch: BatchShape) -> float:
        if batch.num_seqs == 0:
            return 0.0
        return sum(r.seconds for r in self.explain(batch)) + self.spec.step_overhead

    # ---- fast path ----------------------------------------------------------------------------
    def step_time(self, out: SchedulerOutput) -> float:
        if not out.request_ids:
            return 0.0
        x = batch_vector(out)
        return (self._sampling_step if x[3] else self._silent_step)(*x)

    def transfer_time(self, num_bytes: int, src_tier: str, dst_tier: str) -> float:
        if num_bytes <= 0:
            return 0.0
        if src_tier == "staging":
            # a received hand-off copied into the KV pool: read and write device memory
            return 2 * num_bytes / self.bandwidth
        if dst_tier in ("peer", "peer_layer"):
            # a prefill worker's KV to another device: over the device interconnect (NVLink, HCCS)
            # within a node, else over the node network
            link = self.spec.links.get("hbm-hbm") or self.spec.link("node", "node")
            return link.time(num_bytes)
        if src_tier == dst_tier == "hbm":
            return self.spec.link("hbm", "hbm").time(num_bytes)
        return self.spec.link(src_tier, dst_tier).time(num_bytes)

    def _compile(self, linear: list[float], general: list[tuple]) -> Callable[..., float]:
        """The step-time formula as one Python expression over the six batch fields.

        Built once per model from the graph's coefficients (numbers written with repr, so exact);
        evaluating it costs a few microseconds, which matters at a million steps per run.
        """
        p, w = self.peak, self.bandwidth
        terms = [f"{c!r} * x{j}" for j, c in enumerate(linear) if c]
        for count, f0, fterms, b0, bterms in general:
            f = " + ".join([repr(count * f0 / p)] + [f"{count * c / p!r} * x{j}" for j, c in fterms])
            b = " + ".join([repr(count * b0 / w)] + [f"{count * c / w!r} * x{j}" for j, c in bterms])
            terms.append(f"max({f}, {b})")
        body = " + ".join(terms) or "0.0"
        args = ", ".join(f"x{j}" for j in range(_NUM_FIELDS))
        source = f"lambda {args}: ({body}) / {self.spec.efficiency!r} + {self.spec.step_overhead!r}"
        return eval(compile(source, f"<roofline {self.name}>", "eval"), {"max": max})

    def _extract(self, sampled: int) -> tuple[list[float], list[tuple]]:
        """Affine coefficients of every operator, from the graph at a base batch and unit steps."""
        base = [0, 0, 0, sampled, 0, 0]

        def ops_at(x: list[int]) -> list:
            return step_operators(self.shape, BatchShape(*x), self.dtype)

        ref = ops_at(base)
        units = []
        for j in range(_NUM_FIELDS):
            x = list(base)
            x[j] += 1
            units.append(ops_at(x))
        linear = [0.0] * _NUM_FIELDS
        general = []
        for k, op in enumerate(ref):
            fc = [units[j][k].flops - op.flops for j in range(_NUM_FIELDS)]
            bc = [units[j][k].bytes - op.bytes for j in range(_NUM_FIELDS)]
            f0 = op.flops - sum(fc[j] * base[j] for j in range(_NUM_FIELDS))
            b0 = op.bytes - sum(bc[j] * base[j] for j in range(_NUM_FIELDS))
            used = {j for j in range(_NUM_FIELDS) if fc[j] or bc[j]}
            if f0 == 0 and b0 == 0 and len(used) == 1:
                (j,) = used
                linear[j] += op.count * max(fc[j] / self.peak, bc[j] / self.bandwidth)
            else:
                general.append((op.count, f0, tuple((j, fc[j]) for j in range(_NUM_FIELDS) if fc[j]),
                                b0, tuple((j, bc[j]) for j in range(_NUM_FIELDS) if bc[j])))
        return linear, general
