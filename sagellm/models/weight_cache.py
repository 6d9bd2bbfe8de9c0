"""On-disk cache of dequantized GGUF weights (safetensors) and converted tokenizers.

Dequantizing a GGUF file and converting its tokenizer take ~20 s on a small CPU; reading the cached
float32 safetensors takes about a second. Entries are keyed by the GGUF file's resolved path, size
and modification time, so a changed file is never served from a stale entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sagellm.models.shape import ModelShape, RopeScaling

CACHE_VERSION = 1


def cache_root() -> Path:
    """`$SAGELLM_CACHE_DIR`, else `~/.cache/sagellm`."""
    return Path(os.environ.get("SAGELLM_CACHE_DIR") or Path.home() / ".cache" / "sagellm").expanduser()


def cache_enabled() -> bool:
    return os.environ.get("SAGELLM_NO_CACHE", "") not in ("1", "true", "yes")


def _key(path: Path) -> str:
    st = path.stat()
    raw = f"v{CACHE_VERSION}|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


def _entry(path: Path) -> Path:
    return cache_root() / "weights" / _key(path)


def load_cached(path: Path, dtype: torch.dtype) -> tuple[ModelShape, dict[str, torch.Tensor]] | None:
    """The cached (shape, weights) of GGUF file `path` in `dtype`, or None when not cached."""
    entry = _entry(path)
    try:
        meta = json.loads((entry / "shape.json").read_text())
        weights = load_file(str(entry / "weights.safetensors"))
    except (OSError, ValueError):
        return None
    rope = meta.pop("rope_scaling", None)
    meta["eos_token_ids"] = tuple(meta.get("eos_token_ids", ()))
    shape = ModelShape(**meta, rope_scaling=RopeScaling(**rope) if rope else None)
    return shape, {k: v.to(dtype) for k, v in weights.items()}


def store(path: Path, shape: ModelShape, weights: dict[str, torch.Tensor]) -> None:
    """Write the float32 weights of GGUF file `path`; best effort (an unwritable cache is skipped)."""
    entry = _entry(path)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=entry.parent))
        save_file({k: v.float().contiguous() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
        (tmp / "shape.json").write_text(json.dumps(dataclasses.asdict(shape)))
        os.rename(tmp, entry)
    except OSError:
        return


def tokenizer_cache_dir() -> Path | None:
    return cache_root() / "tokenizers" if cache_enabled() else None
