"""Hardware descriptions for the simulator: roofline spec files and calibrated profiles."""

from simulator.hardware.spec import HardwareError, HardwareSpec, Link, available_specs, load_spec

__all__ = ["HardwareError", "HardwareSpec", "Link", "available_specs", "load_spec"]
