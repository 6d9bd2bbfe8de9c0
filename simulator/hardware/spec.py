"""Roofline hardware specs: peak FLOP/s per dtype, memory, links (YAML files in `specs/`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sagellm.config import load_yaml_mapping
from sagellm.errors import InputError, show

SPEC_DIR = Path(__file__).parent / "specs"
TIERS = ("hbm", "ddr", "nvme")
_TOP_KEYS = {"name", "display_name", "vendor", "kind", "peak_flops", "memory", "links", "efficiency", "step_overhead"}


class HardwareError(InputError):
    """A hardware name or spec file is wrong; the message names the field."""


@dataclass(frozen=True)
class Link:
    """A data path: `bandwidth` bytes/s per direction, one-way `latency` seconds."""

    bandwidth: float
    latency: float

    def time(self, num_bytes: float) -> float:
        return self.latency + num_bytes / self.bandwidth


@dataclass(frozen=True)
class HardwareSpec:
    """One accelerator (or CPU) as the roofline model sees it.

    `peak_flops` maps dtype to dense FLOP/s; `memory_bandwidth` is bytes/s of the device memory
    (the "hbm" tier); `links` maps "a-b" tier pairs ("hbm-ddr", "ddr-nvme", "hbm-hbm",
    "node-node") to a `Link`. `efficiency` is the fraction of peak that real kernels reach and
    `step_overhead` a fixed time per step, both to be calibrated.
    """

    name: str
    display_name: str
    vendor: str
    kind: str
    peak_flops: dict[str, float]
    memory_capacity: float
    memory_bandwidth: float
    links: dict[str, Link]
    efficiency: float
    step_overhead: float

    def peak(self, dtype: str) -> float:
        try:
            return self.peak_flops[dtype]
        except KeyError:
            raise HardwareError(
                f"hardware {self.name!r} has no peak_flops for dtype {dtype!r}; it lists {sorted(self.peak_flops)}"
            ) from None

    def link(self, src: str, dst: str) -> Link:
        """The path between two tiers; a path through "ddr" when there is no direct link."""
        for key in (f"{src}-{dst}", f"{dst}-{src}"):
            if key in self.links:
                return self.links[key]
        if src != dst and "ddr" not in (src, dst) and src in TIERS and dst in TIERS:
            a, b = self.link(src, "ddr"), self.link("ddr", dst)
            return Link(min(a.bandwidth, b.bandwidth), a.latency + b.latency)
        raise HardwareError(f"hardware {self.name!r} has no link between {src!r} and {dst!r}; it has "
                            f"{sorted(self.links)}")

    @classmethod
    def from_dict(cls, d: dict, source: str) -> HardwareSpec:
        if not isinstance(d, dict):
            raise HardwareError(f"{source}: a hardware spec must be a mapping")
        unknown = set(d) - _TOP_KEYS
        if unknown:
            raise HardwareError(f"{source}: unknown key(s) {show(list(unknown))}; allowed: {sorted(_TOP_KEYS)}")
        peaks = _mapping(d, "peak_flops", source)
        memory = _mapping(d, "memory", source)
        links = {k: Link(_positive(v, "bandwidth", f"{source}: links.{k}"), _non_negative(v, "latency",
                                                                                        f"{source}: links.{k}"))
                 for k, v in _mapping(d, "links", source).items()}
        eff = _positive(d, "efficiency", source)
        if eff > 1:
            raise HardwareError(f"{source}: efficiency must be in (0, 1], got {eff}")
        return cls(
            name=str(d.get("name") or Path(source).stem),
            display_name=str(d.get("display_name", d.get("name", ""))),
            vendor=str(d.get("vendor", "")),
            kind=str(d.get("kind", "")),
            peak_flops={k: _positive(peaks, k, f"{source}: peak_flops") for k in peaks},
            memory_capacity=_positive(memory, "capacity_bytes", f"{source}: memory"),
            memory_bandwidth=_positive(memory, "bandwidth", f"{source}: memory"),
            links=links,
            efficiency=eff,
            step_overhead=_non_negative(d, "step_overhead", source),
        )


def _mapping(d: dict, key: str, source: str) -> dict:
    v = d.get(key)
    if not isinstance(v, dict) or not v:
        raise HardwareError(f"{source}: {key} must be a non-empty mapping")
    return v


def _number(d: dict, key: str, source: str) -> float:
    v = d.get(key) if isinstance(d, dict) else None
    if isinstance(v, str):
        # PyYAML reads "989.4e12" (no exponent sign) as a string; accept it as the number it is.
        try:
            v = float(v)
        except ValueError:
            pass
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise HardwareError(f"{source}: {key} must be a number, got {show(v)}")
    return float(v)


def _positive(d: dict, key: str, source: str) -> float:
    v = _number(d, key, source)
    if v <= 0:
        raise HardwareError(f"{source}: {key} must be > 0, got {v}")
    return v


def _non_negative(d: dict, key: str, source: str) -> float:
    v = _number(d, key, source)
    if v < 0:
        raise HardwareError(f"{source}: {key} must be >= 0, got {v}")
    return v


def available_specs() -> list[str]:
    return sorted(p.stem for p in SPEC_DIR.glob("*.yaml"))


def load_spec(name_or_path: str | Path) -> HardwareSpec:
    """A spec by name (a file in `specs/`) or by path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = SPEC_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise HardwareError(f"hardware: unknown hardware {show(str(name_or_path))}; known: {available_specs()} "
                                "(or a path to a spec .yaml, or a calibrated profile)")
    return HardwareSpec.from_dict(load_yaml_mapping(path, "hardware: spec file", HardwareError), str(path))
