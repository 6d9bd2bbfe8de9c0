"""Profiled cost model: step time fitted to the live engine's measured steps on this machine.

Model: step_time = c0 + sum_k c_k * feature_k(batch), with non-negative coefficients fitted by
least squares on relative error, where the features come from the execution graph:
GEMM FLOPs (projections and MLP), the same FLOPs for at most `knee` tokens (small GEMMs run at a
lower efficiency than large ones: on this CPU one to two rows cost about the same, then each row up
to about eight costs several times what it does in a large batch), LM-head FLOPs (rows that
sample), attention FLOPs (causal query-key pairs), KV bytes read by attention, and counts of
prefill chunks and decodes (per-request work outside the kernels: metadata, gathers, sampling).
Each feature scales with the work it names, so the fit extrapolates along the same physical terms
the roofline model uses. The knee is chosen from a few candidates by the fit on training samples.
All features but the small-GEMM one are linear in `BatchShape`, so `step_time` is seven
multiply-adds and a `min`.

A profile is two files in `simulator/hardware/profiles/`: `<id>.csv` (the samples) and
`<id>.json` (machine and model identity, dtype, coefficients, held-out error).
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sagellm.config import ConfigError
from sagellm.core.outputs import SchedulerOutput
from sagellm.graph import BatchShape, step_operators
from sagellm.graph.batch import batch_vector
from sagellm.models.shape import ModelShape

PROFILE_DIR = Path(__file__).resolve().parent.parent / "hardware" / "profiles"
FEATURES = ("intercept", "gemm_flops", "gemm_flops_small_batch", "lm_head_flops", "attention_flops", "kv_bytes",
            "prefill_chunks", "decodes")
KNEES = (2, 4, 8, 16, 32)
_BATCH_FIELDS = ("num_tokens", "num_seqs", "num_decodes", "num_sampled", "attention_pairs", "kv_context_tokens")


def features(shape: ModelShape, dtype: str, batch: BatchShape, knee: int = 8) -> list[float]:
    """The model's regressors for one batch (see module docstring), from `sagellm.graph`."""
    ops = step_operators(shape, batch, dtype)
    gemm = head = attn_flops = kv_bytes = 0.0
    for o in ops:
        if o.name == "lm_head":
            head += o.total_flops
        elif o.kind == "gemm":
            gemm += o.total_flops
        elif o.kind == "attention":
            attn_flops += o.total_flops
            kv_bytes += o.total_bytes
    small = gemm / batch.num_tokens * min(batch.num_tokens, knee) if batch.num_tokens else 0.0
    return [1.0, gemm, small, head, attn_flops, kv_bytes, float(batch.num_seqs - batch.num_decodes),
            float(batch.num_decodes)]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def machine_identity() -> dict[str, Any]:
    """This machine as profiles record it (standard library only, so lookups need no torch)."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": name, "cpu_count": os.cpu_count(), "system": platform.system()}


def model_key(shape: ModelShape) -> str:
    return (f"{shape.architecture}-L{shape.num_layers}-H{shape.hidden_size}-I{shape.intermediate_size}"
            f"-KV{shape.num_kv_heads}-V{shape.vocab_size}")


def profile_id(shape: ModelShape, dtype: str, device: str = "cpu") -> str:
    ident = machine_identity()
    cpu = "".join(ch if ch.isalnum() else "-" for ch in ident["cpu"].lower()).strip("-")
    cpu = "-".join(p for p in cpu.split("-") if p)[:40]
    return f"{device}-{cpu}-{ident['cpu_count']}c__{model_key(shape)}__{dtype}"


@dataclass(frozen=True)
class FitReport:
    """Relative errors |pred - measured| / measured of a fit on samples it did not see."""

    num_train: int
    num_heldout: int
    median_error: float
    p90_error: float
    max_error: float


class ProfiledCostModel:
    """Step time = intercept + coefficients . features, fitted on this machine's measured steps.

    `transfer_time` uses the measured `copy_bandwidth` (bytes/s) and `copy_latency` (s) of the
    engine's own KV copies when the profile has them, else the host memory bandwidth estimate.
    """

    def __init__(self, shape: ModelShape, dtype: str, coefficients: list[float], meta: dict[str, Any] | None = None,
                 copy_bandwidth: float = 10e9, copy_latency: float = 0.0, knee: int = 8) -> None:
        if len(coefficients) != len(FEATURES):
            raise ValueError(f"expected {len(FEATURES)} coefficients {FEATURES}, got {len(coefficients)}")
        if knee <= 0:
            raise ValueError(f"knee must be > 0, got {knee}")
        self.shape, self.dtype, self.knee = shape, dtype, knee
        self.coefficients = [float(c) for c in coefficients]
        self.meta = meta or {}
        self.copy_bandwidth, self.copy_latency = copy_bandwidth, copy_latency
        self.name = f"profiled({self.meta.get('id', model_key(shape))})"
        # All features but the small-GEMM one are linear in BatchShape: fold their coefficients into
        # one weight per batch field; the small-GEMM term is a weight times min(tokens, knee).
        linear = list(self.coefficients)
        linear[2] = 0.0
        self._small_gemm = self.coefficients[2] * features(shape, dtype, BatchShape(num_tokens=1), knee)[1]
        self._intercept = linear[0]
        base = _dot(linear, features(shape, dtype, BatchShape(), knee))
        self._weights = []
        for j in range(len(_BATCH_FIELDS)):
            unit = [0] * len(_BATCH_FIELDS)
            unit[j] = 1
            self._weights.append(_dot(linear, features(shape, dtype, BatchShape(*unit), knee)) - base)

    def predict(self, batch: BatchShape) -> float:
        return _dot(self.coefficients, features(self.shape, self.dtype, batch, self.knee))

    def step_time(self, out: SchedulerOutput) -> float:
        if not out.request_ids:
            return 0.0
        x = batch_vector(out)
        t = self._intercept + self._small_gemm * min(x[0], self.knee)
        for w, v in zip(self._weights, x):
            t += w * v
        return t

    def transfer_time(self, num_bytes: int, src_tier: str, dst_tier: str) -> float:
        return self.copy_latency + num_bytes / self.copy_bandwidth if num_bytes > 0 else 0.0

    # ---- fitting ---------------------------------------------------------------------------------
    @classmethod
    def fit(cls, shape: ModelShape, dtype: str, batches: list[BatchShape], seconds: list[float],
            meta: dict[str, Any] | None = None) -> ProfiledCostModel:
        """Non-negative least squares on relative error (rows scaled by 1 / measured time), for each
        candidate knee; keeps the knee whose fit has the smallest median relative error."""
        import numpy as np
        from scipy.optimize import nnls

        if len(batches) != len(seconds) or len(batches) < len(FEATURES):
            raise ValueError(f"need at least {len(FEATURES)} samples with times, got {len(batches)}")
        y = np.array(seconds, dtype=np.float64)
        best: tuple[float, int, list[float]] | None = None
        for knee in KNEES:
            x = np.array([features(shape, dtype, b, knee) for b in batches], dtype=np.float64)
            scale = x.max(axis=0)
            scale[scale == 0] = 1.0
            coef, _ = nnls((x / scale) / y[:, None], np.ones_like(y))
            coef = coef / scale
            err = float(np.median(np.abs(x @ coef - y) / y))
            if best is None or err < best[0]:
                best = (err, knee, list(coef))
        return cls(shape, dtype, best[2], meta, knee=best[1])

    @classmethod
    def fit_with_holdout(cls, shape: ModelShape, dtype: str, batches: list[BatchShape], seconds: list[float],
                         heldout_fraction: float = 0.25, seed: int = 0, meta: dict[str, Any] | None = None
                         ) -> tuple[ProfiledCostModel, FitReport]:
        """Fit on a random (seeded) part, report errors on the rest, then refit on everything."""
        idx = list(range(len(batches)))
        random.Random(seed).shuffle(idx)
        k = max(1, round(len(idx) * heldout_fraction))
        test, train = idx[:k], idx[k:]
        model = cls.fit(shape, dtype, [batches[i] for i in train], [seconds[i] for i in train])
        errors = sorted(abs(model.predict(batches[i]) - seconds[i]) / seconds[i] for i in test)
        report = FitReport(len(train), len(test), statistics.median(errors),
                           errors[min(len(errors) - 1, int(0.9 * len(errors)))], errors[-1])
        return cls.fit(shape, dtype, batches, seconds, meta), report

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
            "features": list(FEATURES),
            "coefficients": self.coefficients,
            "knee": self.knee,
            "copy_bandwidth": self.copy_bandwidth,
            "copy_latency": self.copy_latency,
        })
        path.with_suffix(".json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Path) -> ProfiledCostModel:
        shape, dtype, doc = read_profile(path)
        try:
            return cls(shape, dtype, doc["coefficients"], doc, doc.get("copy_bandwidth", 10e9),
                       doc.get("copy_latency", 0.0), doc.get("knee", 8))
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


def find_local_profile(shape: ModelShape, dtype: str, directory: Path = PROFILE_DIR) -> Path:
    """The profile of this machine for this model and dtype; ConfigError naming the fix if none."""
    path = Path(directory) / f"{profile_id(shape, dtype)}.json"
    if path.exists():
        return path
    known = sorted(p.name for p in Path(directory).glob("*.json")) if Path(directory).exists() else []
    raise ConfigError(
        f"hardware: 'local' needs a calibrated profile of this machine for {model_key(shape)} in {dtype} "
        f"({path.name} in {directory}); run `sagellm calibrate --dtype {dtype}` first. Profiles present: {known}"
    )
