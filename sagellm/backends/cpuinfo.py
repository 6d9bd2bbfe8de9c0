"""This machine's CPU: its name and widest vector instruction set, from /proc/cpuinfo where there
is one (standard library only)."""

from __future__ import annotations

import platform

# Widest first: the first whose flag /proc/cpuinfo lists names the instruction set the math
# libraries (oneDNN, OpenBLAS) pick their kernels for. A VM may hide a host's AVX-512, and the
# same CPU model then runs the model at another speed.
_VECTOR_ISAS = (("avx512", "avx512f"), ("avx2", "avx2"), ("avx", "avx"), ("sve", "sve"), ("neon", "asimd"))


def _cpuinfo_lines() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return f.readlines()
    except OSError:
        return []


def cpu_model_name() -> str:
    """The "model name" line of /proc/cpuinfo, else what `platform` knows."""
    for line in _cpuinfo_lines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_vector_isa(lines: list[str] | None = None) -> str:
    """The widest vector instruction set the CPU's flags list ("avx512", "avx2", "avx", "sve",
    "neon"), or "" when /proc/cpuinfo lists none of them (or there is no /proc/cpuinfo)."""
    flags = _cpu_flags(_cpuinfo_lines() if lines is None else lines) or set()
    return next((isa for isa, flag in _VECTOR_ISAS if flag in flags), "")


def _cpu_flags(lines: list[str]) -> set[str] | None:
    """The first "flags" (x86) or "Features" (arm64) line's flags; None when there is none."""
    for line in lines:
        key = line.split(":", 1)[0].strip()
        if key in ("flags", "Features") and ":" in line:
            return set(line.split(":", 1)[1].split())
    return None


# Flags whose presence changes which kernels the math libraries run (and so a step's speed).
MATTERING_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni",
                   "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve")

_ID_FIELDS = (("vendor_id", "vendor"), ("CPU implementer", "vendor"), ("cpu family", "family"),
              ("model", "model"), ("CPU part", "model"), ("stepping", "stepping"), ("CPU variant", "stepping"))


def cpu_identity(lines: list[str] | None = None) -> dict[str, str | list[str]]:
    """The first CPU's vendor, family, model and stepping as /proc/cpuinfo gives them (x86:
    vendor_id, cpu family, model, stepping; arm64: CPU implementer, part, variant), and which of
    `MATTERING_FLAGS` it lists (`flags`). Fields it does not list are left out."""
    lines = _cpuinfo_lines() if lines is None else lines
    ident: dict[str, str | list[str]] = {}
    for line in lines:
        if ":" not in line:
            if ident:
                break  # the end of the first processor's block
            continue
        key, value = (part.strip() for part in line.split(":", 1))
        for source, name in _ID_FIELDS:
            if key == source and name not in ident:
                ident[name] = value
    present = _cpu_flags(lines)
    if present is not None:
        ident["flags"] = [f for f in MATTERING_FLAGS if f in present]
    return ident
