"""Hardware backends: device detection and information."""

from sagellm.backends.detect import DeviceInfo, device_info, empty_cache, resolve_device

__all__ = ["DeviceInfo", "device_info", "empty_cache", "resolve_device"]
