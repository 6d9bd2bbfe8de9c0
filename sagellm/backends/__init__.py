"""Hardware backends: device detection and information.

`detect` needs torch; `cpuinfo` and `cpu_time` do not, and the simulator imports them, so the
torch-based names are loaded on first use rather than with the package.
"""

from typing import Any

__all__ = ["DeviceInfo", "device_info", "empty_cache", "resolve_device"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from sagellm.backends import detect

        return getattr(detect, name)
    raise AttributeError(f"module 'sagellm.backends' has no attribute {name!r}")
