"""Which machine a calibrated profile belongs to: this machine's identity, the profile's name, and
finding this machine's profile (standard library only, so that a lookup needs no torch).

A profile prices steps on the machine it was timed on, and only there: the same CPU name ("AMD
EPYC", "Intel(R) Xeon(R) Processor") covers models whose steps differ by 2x, and a VM may hide a
host's AVX-512. So a profile's name carries the CPU's family and model and its widest vector
instruction set, and a profile found by name is used only if the identity it recorded (vendor,
family, model, the flags that select kernels, core count) is this machine's.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

from sagellm.backends.cpuinfo import cpu_identity, cpu_model_name, cpu_vector_isa
from sagellm.config import ConfigError
from sagellm.models.shape import ModelShape

PROFILE_DIR = Path(__file__).resolve().parent.parent / "hardware" / "profiles"

# What must be equal between the machine a profile was timed on and the one it prices.
IDENTITY_KEYS = ("vendor", "family", "model", "isa", "flags", "cpu_count")


class ProfileFromAnotherMachine(ConfigError):
    """The profile found for this machine by name was timed on another machine (its message names both)."""


def machine_identity() -> dict[str, Any]:
    """This machine as profiles record it: the CPU's name, vendor, family, model, stepping, the
    kernel-selecting flags it has (`flags`), its widest vector instruction set (`isa`), core count
    and OS."""
    return {"cpu": cpu_model_name(), **cpu_identity(), "isa": cpu_vector_isa(), "cpu_count": os.cpu_count(),
            "system": platform.system()}


def model_key(shape: ModelShape) -> str:
    return (f"{shape.architecture}-L{shape.num_layers}-H{shape.hidden_size}-I{shape.intermediate_size}"
            f"-KV{shape.num_kv_heads}-V{shape.vocab_size}")


def profile_id(shape: ModelShape, dtype: str, device: str = "cpu", threads: int | None = None) -> str:
    """The profile's name: device, CPU name, `f<family>m<model>` (when /proc/cpuinfo gives them),
    its vector instruction set, core count, and `-<n>t` when it was timed with `threads` threads
    other than one per core (a worker of a multi-process cluster runs one thread)."""
    ident = machine_identity()
    cpu = "".join(ch if ch.isalnum() else "-" for ch in ident["cpu"].lower()).strip("-")
    cpu = "-".join(p for p in cpu.split("-") if p)[:40]
    if ident.get("family") and ident.get("model"):
        cpu = f"{cpu}-f{ident['family']}m{ident['model']}"
    if ident["isa"]:
        cpu = f"{cpu}-{ident['isa']}"
    suffix = f"-{threads}t" if threads and threads != ident["cpu_count"] else ""
    return f"{device}-{cpu}-{ident['cpu_count']}c{suffix}__{model_key(shape)}__{dtype}"


def describe_machine(ident: dict[str, Any]) -> str:
    """One line naming a machine by its recorded identity (what it lacks is left out)."""
    parts = [str(ident.get("cpu", "an unnamed CPU"))]
    if ident.get("vendor"):
        parts.append(str(ident["vendor"]))
    if ident.get("family") is not None and ident.get("model") is not None:
        parts.append(f"family {ident['family']} model {ident['model']}")
    if ident.get("flags") is not None:
        parts.append("flags " + (" ".join(ident["flags"]) or "none that select kernels"))
    elif ident.get("isa"):
        parts.append(str(ident["isa"]))
    if ident.get("cpu_count") is not None:
        parts.append(f"{ident['cpu_count']} cores")
    return ", ".join(parts)


def identity_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The `IDENTITY_KEYS` on which a profile's recorded machine and this one differ, or that the
    profile does not record (a profile from before they were recorded cannot be checked)."""
    return [key for key in IDENTITY_KEYS
            if key in current and (key not in recorded or recorded[key] != current[key])]


def find_local_profile(shape: ModelShape, dtype: str, directory: Path = PROFILE_DIR,
                       threads: int | None = None) -> Path:
    """The profile of this machine for this model, dtype and thread count (None: one thread per
    core). ConfigError naming the fix when there is none, and naming both machines when the
    profile of that name was timed on another machine."""
    path = Path(directory) / f"{profile_id(shape, dtype, threads=threads)}.json"
    flag = f" --threads {threads}" if threads else ""
    fix = f"run `sagellm calibrate --dtype {dtype}{flag}` on this machine"
    if not path.exists():
        known = sorted(p.name for p in Path(directory).glob("*.json")) if Path(directory).exists() else []
        raise ConfigError(
            f"hardware: 'local' needs a calibrated profile of this machine for {model_key(shape)} in {dtype} "
            f"({path.name} in {directory}); {fix} first. Profiles present: {known}")
    try:
        recorded = json.loads(path.read_text()).get("machine", {})
    except (OSError, ValueError, AttributeError) as exc:
        raise ConfigError(f"hardware: cannot read calibrated profile {str(path)!r}: {exc}") from exc
    current = machine_identity()
    differ = identity_differences(recorded if isinstance(recorded, dict) else {}, current)
    if differ:
        raise ProfileFromAnotherMachine(
            f"hardware: the profile {path.name} was calibrated on another machine ({describe_machine(recorded)}) "
            f"than this one ({describe_machine(current)}; they differ in {', '.join(differ)}): its step times "
            f"do not price this machine; {fix}")
    return path
