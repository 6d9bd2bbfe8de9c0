"""`ExperimentConfig`: one workload, one policy, on the simulator and the live engine, with sweeps.

```yaml
name: load-sweep
description: ...
model: null                 # preset, model path, or null (sagellm.model.model_id: the default model)
hardware: local             # live runs need this machine: "local" (its calibrated profile)
sides: [simulate, live]
sagellm: {...}              # any SageLLMConfig field
workload: {...}             # simulator.workloads.WorkloadSpec
slo: {ttft_ms: 2000, tpot_ms: 300}
cluster: {num_replicas: 1}  # replicas behind a router (live: one worker process each)
live: {repeats: 3, warmup_requests: 4}
calibrate: true             # calibrate this machine first if no profile exists
sweep:                      # optional grid over any field, by dotted path
  workload.arrival.rate: [0.2, 0.4]
  sagellm.scheduler.max_num_seqs: [16, 64]
  variants:                 # or several fields at once per value, named by its label
    - {label: two-replicas, cluster.num_replicas: 2}
```
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sagellm.config import ConfigError, build_section, load_yaml_mapping, unknown_key_message
from sagellm.errors import show
from simulator.config import SimulationConfig

SIDES = ("simulate", "live")
# A sweep key whose values each set several fields at once: {label: ..., "dotted.path": value, ...}
VARIANTS = "variants"
_SIM_KEYS = ("name", "model", "hardware", "sagellm", "cluster", "workload", "slo", "memory_utilization",
             "kv_sample_interval")
_KEYS = (*_SIM_KEYS, "description", "sides", "live", "sweep", "calibrate")


@dataclass(frozen=True)
class LiveConfig:
    """Live side: `repeats` runs of the trace per point (fidelity uses their median),
    `warmup_requests` short requests first, `timeout_s` per run. On a shared VM the hypervisor can
    take CPU from this machine mid-run ("steal" time in /proc/stat); a run that lost more than
    `max_cpu_steal` of its CPU time is kept on disk but not counted, and run again, at most
    `max_attempts` times per point in all (null: count every run). With `speed_probe` (and a
    calibrated profile on the simulate side), a few fixed steps are timed before and after each
    live run; the simulator's step times are scaled by how much slower or faster than its profile
    the machine ran them (the median over the point's probes), so a prediction is made for the
    machine as it is during the measurement, not as it was at calibration. With `quiet_wait_s` > 0
    and `max_cpu_steal` set, a run does not start while the machine is noisy: the speed probe
    before it is repeated (30 s apart) until the hypervisor takes at most `max_cpu_steal` of the
    CPU during it, for up to `quiet_wait_s` seconds, after which the run starts anyway. Steal is
    only seen while this VM is busy, which is why the probe, not an idle wait, measures it.

    With `serving_reference_s` > 0 (and a calibrated profile), a short reference run is served
    right before each measured run: the requests of another sample of the point's workload (seed
    + 1) arriving in its first `serving_reference_s` seconds (at least one). Its steps, timed while
    serving, set the simulator's serving factors (measured / profiled step time, per kind, over
    the point's counted runs' references) in place of the probe's speed factor times the
    profile's own serving factors. The measured runs' steps are never used to set them.
    `serving_reference_requests: N` sizes the reference by requests instead: the first N of that
    sample (over the whole workload's length, its steps have the measured run's mix of batch
    shapes, where a few seconds from an empty engine have fewer rows per step). Set one or the
    other. `reference_prediction` says how the references price the point: "paired" (default)
    simulates once per counted live run with that run's own reference, and the prediction is the
    median of those simulations, as the measurement is the median of the runs (the machine's
    speed moves from run to run, and latency is not linear in step speed); "pooled" simulates once
    with the references' steps pooled over the runs. With `serving_reference_after`, a reference
    is also served right after each run; it is also the next run's reference before it (one more
    reference per point than runs). A run is priced by the steps of its references before and after
    it together, so a drift of the machine's speed that is steady over the run cancels.

    With `idle_speed_probe`, an `IdleSpeedProbe` runs beside the engine on idle CPU time only
    (`SCHED_IDLE`) through every reference and run, and its timings are stored with each
    (`idle_probe.parquet`): the machine's speed during the run, which a reference before or after
    it does not see (see docs/experiments.md for how it prices the run)."""

    repeats: int = 3
    warmup_requests: int = 4
    timeout_s: float = 1800.0
    max_cpu_steal: float | None = None
    max_attempts: int = 10
    speed_probe: bool = True
    quiet_wait_s: float = 0.0
    serving_reference_s: float = 0.0
    serving_reference_requests: int = 0
    reference_prediction: str = "paired"
    serving_reference_after: bool = False
    idle_speed_probe: bool = False

    @property
    def serving_reference(self) -> bool:
        return bool(self.serving_reference_s or self.serving_reference_requests)

    def __post_init__(self) -> None:
        if not (isinstance(self.serving_reference_requests, int) and self.serving_reference_requests >= 0):
            raise ConfigError(f"live.serving_reference_requests: must be an integer >= 0 (0: size the reference "
                              f"by live.serving_reference_s), got {show(self.serving_reference_requests)}")
        if self.reference_prediction not in ("paired", "pooled"):
            raise ConfigError(f"live.reference_prediction: must be 'paired' (one simulation per live run, with "
                              f"its own reference) or 'pooled', got {show(self.reference_prediction)}")
        if not isinstance(self.serving_reference_after, bool):
            raise ConfigError(f"live.serving_reference_after: must be true or false, "
                              f"got {show(self.serving_reference_after)}")
        if not isinstance(self.idle_speed_probe, bool):
            raise ConfigError(f"live.idle_speed_probe: must be true or false, got {show(self.idle_speed_probe)}")
        if self.serving_reference_after and not self.serving_reference:
            raise ConfigError("live.serving_reference_after: needs a reference (live.serving_reference_requests "
                              "or live.serving_reference_s)")
        if self.serving_reference_requests and self.serving_reference_s:
            raise ConfigError("live.serving_reference_requests: set it or live.serving_reference_s, not both")
        if not self.serving_reference_s >= 0:
            raise ConfigError(f"live.serving_reference_s: must be >= 0 seconds (0: no reference run), "
                              f"got {self.serving_reference_s}")
        if self.quiet_wait_s < 0:
            raise ConfigError(f"live.quiet_wait_s: must be >= 0 seconds, got {self.quiet_wait_s}")
        if self.quiet_wait_s and (self.max_cpu_steal is None or not self.speed_probe):
            raise ConfigError("live.quiet_wait_s: needs live.max_cpu_steal (the quiet threshold) and "
                              "live.speed_probe: true (the load it is measured under)")
        if self.max_cpu_steal is not None and not 0 < self.max_cpu_steal <= 1:
            raise ConfigError(f"live.max_cpu_steal: must be in (0, 1] or null, got {self.max_cpu_steal}")
        if self.max_attempts < self.repeats:
            raise ConfigError(f"live.max_attempts: must be >= live.repeats ({self.repeats}), got {self.max_attempts}")
        if self.repeats <= 0:
            raise ConfigError(f"live.repeats: must be > 0, got {self.repeats}")
        if self.warmup_requests < 0:
            raise ConfigError(f"live.warmup_requests: must be >= 0, got {self.warmup_requests}")
        if self.timeout_s <= 0:
            raise ConfigError(f"live.timeout_s: must be > 0, got {self.timeout_s}")


@dataclass(frozen=True)
class SweepPoint:
    """One point of a sweep: its index, the overrides (dotted path -> value) and the config they give."""

    index: int
    overrides: dict[str, Any]
    simulation: SimulationConfig

    @property
    def labels(self) -> dict[str, Any]:
        """The overrides for tables: a mapping value with a `label` shows as its label."""
        return {k: v["label"] if isinstance(v, dict) and "label" in v else v for k, v in self.overrides.items()}

    @property
    def slug(self) -> str:
        if not self.overrides:
            return f"{self.index:03d}"
        parts = [v["label"] if isinstance(v, dict) and "label" in v else f"{k.rsplit('.', 1)[-1]}={v}"
                 for k, v in self.overrides.items()]
        return f"{self.index:03d}_" + "_".join(parts).replace("/", "-").replace(" ", "")


@dataclass(frozen=True)
class ExperimentConfig:
    """A validated experiment; `raw` is the file's mapping, `points` the expanded sweep."""

    name: str
    description: str
    sides: tuple[str, ...]
    live: LiveConfig
    calibrate: bool
    sweep: dict[str, list[Any]]
    points: tuple[SweepPoint, ...]
    raw: dict[str, Any] = field(repr=False)
    base_dir: Path = Path(".")

    @classmethod
    def from_dict(cls, data: Any, base_dir: str | Path = ".") -> ExperimentConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"experiment: expected a mapping, got {type(data).__name__}")
        unknown = [key for key in data if key not in _KEYS]
        if unknown:
            raise ConfigError(unknown_key_message(unknown[0], "", sorted(_KEYS)))
        name = data.get("name")
        if not isinstance(name, str) or not name or "/" in name:
            raise ConfigError(f"name: a non-empty name without '/' is required, got {show(name)}")
        sides = data.get("sides", list(SIDES))
        if not isinstance(sides, list) or not sides:
            raise ConfigError(f"sides: a non-empty list of distinct sides from {SIDES}, got {show(sides)}")
        for s in sides:
            if not isinstance(s, str) or s not in SIDES:
                raise ConfigError(f"sides: unknown side {show(s)}; allowed: {list(SIDES)}")
        if len(set(sides)) != len(sides):
            raise ConfigError(f"sides: a non-empty list of distinct sides from {SIDES}, got {show(sides)}")
        live = build_section(LiveConfig, data.get("live") or {}, "live.")
        calibrate = data.get("calibrate", True)
        if not isinstance(calibrate, bool):
            raise ConfigError(f"calibrate: expected true or false, got {show(calibrate)}")
        sweep = data.get("sweep") or {}
        if not isinstance(sweep, dict):
            raise ConfigError("sweep: expected a mapping of dotted field paths to lists of values")
        allowed = sorted(set(_SIM_KEYS) - {"name"})
        for key, values in sweep.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"sweep.{key}: expected a non-empty list of values, got {show(values)}")
            paths = [key]
            if key == VARIANTS:
                for v in values:
                    if not isinstance(v, dict) or not set(v) - {"label"}:
                        raise ConfigError(f"sweep.{VARIANTS}: each value is a mapping of dotted field paths to "
                                          f"values (and a label), got {show(v)}")
                paths = [p for v in values for p in v if p != "label"]
            for path in paths:
                if path.split(".", 1)[0] not in _SIM_KEYS or path.split(".", 1)[0] == "name":
                    raise ConfigError(f"sweep.{key}: can only vary fields under {allowed}, not {show(path)}")
        base = {k: v for k, v in data.items() if k in _SIM_KEYS}
        points = []
        keys = list(sweep)
        for index, combo in enumerate(itertools.product(*(sweep[k] for k in keys))):
            overrides = dict(zip(keys, combo))
            point = copy.deepcopy(base)
            for key, value in overrides.items():
                # A mapping may carry a `label` naming the point; it is not part of the config.
                if isinstance(value, dict):
                    value = {k: v for k, v in value.items() if k != "label"}
                if key == VARIANTS:
                    for path, v in value.items():
                        _set_path(point, path, v)
                else:
                    _set_path(point, key, value)
            try:
                sim = SimulationConfig.from_dict(point, base_dir)
            except ConfigError as exc:
                where = f" (sweep point {overrides})" if overrides else ""
                raise ConfigError(f"{exc}{where}") from exc
            points.append(SweepPoint(index, overrides, sim))
        cfg = cls(name, str(data.get("description", "")), tuple(sides), live, calibrate, sweep, tuple(points),
                  data, Path(base_dir))
        cfg._check_live()
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path) -> ExperimentConfig:
        return cls.from_dict(load_yaml_mapping(path, "experiment file"), Path(path).parent)

    def _check_live(self) -> None:
        if "live" not in self.sides:
            return
        for point in self.points:
            sim = point.simulation
            hw = sim.hardware
            if hw != "local" and not hw.endswith(".json"):
                raise ConfigError(
                    f"hardware: {show(hw)} is a roofline device this machine cannot run, so the live side is "
                    "impossible; use hardware: local (this machine's calibrated profile) or sides: [simulate]"
                )
            workers = sim.cluster.num_replicas
            sched = sim.sagellm.scheduler
            if sched.schedule_mode.value == "strict":
                workers = sched.prefill_workers + sched.decode_workers
            if workers > 8:
                raise ConfigError(f"cluster.num_replicas: the live side runs one worker process per replica or "
                                  f"prefill/decode worker on this machine; {workers} is too many (at most 8)")
            if sim.model is not None and sim.model != sim.sagellm.model.model_id and not Path(sim.model).exists():
                raise ConfigError(f"model: {show(sim.model)} is a shape preset without weights; the live side needs "
                                  "a model path (or null for the default model)")


def _set_path(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        nxt = d.get(k)
        if nxt is None:
            nxt = d[k] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"sweep.{dotted}: {show(k)} is not a mapping in the experiment")
        d = nxt
    d[keys[-1]] = value
