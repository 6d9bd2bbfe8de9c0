"""Optional compiled CPU kernels, built on first use with torch's C++ extension tool.

`paged_decode_kernel()` returns the compiled paged decode-attention function, or None when it
cannot be built here (no compiler, `SAGELLM_DISABLE_KERNELS=1`, a non-CPU device); callers then
use the pure-torch path, which computes the same result with a gathered copy of the context.
Side effect: the first build writes to `$SAGELLM_CACHE_DIR/torch_extensions` (about a minute).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

_lock = threading.Lock()
_kernel: Callable | None = None
_tried = False


def kernels_enabled() -> bool:
    return os.environ.get("SAGELLM_DISABLE_KERNELS", "") not in ("1", "true", "yes")


def paged_decode_kernel() -> Callable | None:
    global _kernel, _tried
    if not kernels_enabled():
        return None
    with _lock:
        if _tried:
            return _kernel
        _tried = True
        try:
            from torch.utils.cpp_extension import load

            from sagellm.models.weight_cache import cache_root

            source = Path(__file__).with_name("paged_decode.cpp")
            # Keyed by the source's content, so checkouts of the same code share one build.
            digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
            build_dir = cache_root() / "torch_extensions" / f"paged_decode-{digest}"
            build_dir.mkdir(parents=True, exist_ok=True)
            module = load(
                name="sagellm_paged_decode",
                sources=[str(source)],
                extra_cflags=["-O3", "-march=native", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                build_directory=str(build_dir),
                verbose=False,
            )
            _kernel = module.paged_decode
        except Exception as exc:  # no compiler, no ninja, unsupported platform: use the torch path
            first_line = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            log.warning("paged decode kernel unavailable (%s); using the torch implementation", first_line)
            _kernel = None
        return _kernel
