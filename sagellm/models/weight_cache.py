"""On-disk cache of dequantized GGUF weights (safetensors) and converted tokenizers.

Dequantizing a GGUF file and converting its tokenizer take ~20 s on a small CPU; reading the cached
float32 safetensors takes about a second, and checking their SHA-256 a third of one. Entries are keyed
by the GGUF file's resolved path, size and modification time, so a changed file is never served from a
stale entry, and verified on every load, so a damaged entry is rebuilt rather than served.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sagellm.models.shape import ModelShape, RopeScaling

# Version 2 adds the weights' SHA-256 to each entry; older entries are never read.
CACHE_VERSION = 2

log = logging.getLogger(__name__)


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


def _digest(file: Path) -> str:
    with file.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def load_cached(path: Path, dtype: torch.dtype) -> tuple[ModelShape, dict[str, torch.Tensor]] | None:
    """The cached (shape, weights) of GGUF file `path` in `dtype`, or None when not cached.

    An entry whose weights no longer match the SHA-256 written with them (flipped bytes, a truncated
    file), or whose files cannot be parsed, is removed with a one-line warning and None is returned,
    so the caller rebuilds it from the GGUF file: a corrupted cache never changes what is served."""
    entry = _entry(path)
    if not entry.is_dir():
        return None
    try:
        meta = json.loads((entry / "shape.json").read_text())
        if _digest(entry / "weights.safetensors") != meta.pop("weights_sha256"):
            raise ValueError("the weights do not match their SHA-256")
        weights = load_file(str(entry / "weights.safetensors"))
        rope = meta.pop("rope_scaling", None)
        meta["eos_token_ids"] = tuple(meta.get("eos_token_ids", ()))
        shape = ModelShape(**meta, rope_scaling=RopeScaling(**rope) if rope else None)
    except Exception as exc:  # any damage to the entry (OSError, JSON, safetensors, fields) means rebuild
        log.warning("weight cache entry %s for %s is damaged (%s: %s); rebuilding it from the model file",
                    entry, path, type(exc).__name__, str(exc)[:200])
        shutil.rmtree(entry, ignore_errors=True)
        return None
    return shape, {k: v.to(dtype) for k, v in weights.items()}


def store(path: Path, shape: ModelShape, weights: dict[str, torch.Tensor]) -> None:
    """Write the float32 weights of GGUF file `path` with their SHA-256; best effort (an unwritable
    cache is skipped, and a partial entry is removed)."""
    entry = _entry(path)
    tmp: Path | None = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=entry.parent))
        save_file({k: v.float().contiguous() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
        meta = {**dataclasses.asdict(shape), "weights_sha256": _digest(tmp / "weights.safetensors")}
        (tmp / "shape.json").write_text(json.dumps(meta))
        os.rename(tmp, entry)
    except OSError:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def tokenizer_cache_dir() -> Path | None:
    return cache_root() / "tokenizers" if cache_enabled() else None
