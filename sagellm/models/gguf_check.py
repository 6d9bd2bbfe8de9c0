"""Structural check of a GGUF file before `gguf.GGUFReader` touches it (standard library + gguf constants).

GGUFReader memory-maps the file and trusts every count and offset in it: a truncated file fails
late with assorted exceptions, and a corrupt array length can make it loop for a very long time.
`check_gguf_file` walks the header (magic, version, metadata, tensor table) with bounds checks,
then checks that every tensor's data lies inside the file, so such files fail fast with a
ModelLoadError that names the path and the problem.
"""

from __future__ import annotations

import math
import mmap
import struct
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from sagellm.models.errors import ModelLoadError

_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 4
# GGUF metadata value types -> size in bytes of the scalar ones; 8 is STRING, 9 is ARRAY.
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4


class _Cursor:
    """Bounds-checked little-endian reader over a byte buffer; errors name the file."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf, self.path, self.pos, self.end = buf, path, 0, len(buf)

    def fail(self, what: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path}: corrupt or truncated GGUF file: {what}")

    def take(self, n: int, what: str) -> int:
        """Advance over `n` bytes and return where they start; fail if they run past the end."""
        if n < 0 or self.pos + n > self.end:
            raise self.fail(f"{what} at byte {self.pos} needs {n} bytes but the file has {self.end} bytes")
        start = self.pos
        self.pos += n
        return start

    def u32(self, what: str) -> int:
        return struct.unpack_from("<I", self.buf, self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack_from("<Q", self.buf, self.take(8, what))[0]

    def string(self, what: str) -> bytes:
        n = self.u64(what + " length")
        start = self.take(n, what)
        return bytes(self.buf[start : start + n])

    def skip_value(self, vtype: int, what: str) -> None:
        """Skip one metadata value of type `vtype` (arrays recursively), checking every length."""
        if vtype in _SCALAR_SIZES:
            self.take(_SCALAR_SIZES[vtype], what)
        elif vtype == _STRING:
            self.take(self.u64(what + " length"), what)
        elif vtype == _ARRAY:
            itype = self.u32(what + " item type")
            count = self.u64(what + " item count")
            if itype in _SCALAR_SIZES:
                self.take(count * _SCALAR_SIZES[itype], what)
                return
            min_item = {_STRING: 8, _ARRAY: 12}.get(itype)
            if min_item is None:
                raise self.fail(f"{what} has unknown array item type {itype}")
            if count * min_item > self.end - self.pos:
                raise self.fail(
                    f"{what} at byte {self.pos} claims {count} items, more than the rest of the file "
                    f"can hold (the file has {self.end} bytes)"
                )
            for _ in range(count):
                self.skip_value(itype, what)
        else:
            raise self.fail(f"{what} has unknown value type {vtype}")


def check_gguf_file(path: Path) -> None:
    """Raise ModelLoadError unless `path` is a structurally complete little-endian GGUF v2/v3 file.

    Checks: the magic, the version, every metadata entry and tensor-table entry lies inside the
    file, tensor types are known ggml types, element counts fit whole quantization blocks, and
    each tensor's data ends within the file (a truncated download is reported as such). Reads
    only the header pages of the file; no side effects.
    """
    size = path.stat().st_size
    if size < 24:
        raise ModelLoadError(f"{path}: not a GGUF file: only {size} bytes long")
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != _MAGIC:
            raise ModelLoadError(f"{path}: not a GGUF file: bad magic {bytes(buf[:4])!r} (expected b'GGUF')")
        cur = _Cursor(buf, path)
        cur.take(4, "magic")
        version = cur.u32("version")
        if version & 0xFFFF == 0:
            raise ModelLoadError(f"{path}: big-endian GGUF files are not supported")
        if version not in _SUPPORTED_VERSIONS:
            raise ModelLoadError(f"{path}: unsupported GGUF version {version} (supported: 2, 3)")
        n_tensors = cur.u64("tensor count")
        n_kv = cur.u64("metadata count")
        if (n_tensors + n_kv) * 12 > size:
            raise cur.fail(f"header claims {n_tensors} tensors and {n_kv} metadata entries")
        alignment = _DEFAULT_ALIGNMENT
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            label = f"metadata {key.decode('utf-8', 'replace')!r}"
            vtype = cur.u32(label + " type")
            if key == b"general.alignment" and vtype == _UINT32:
                alignment = struct.unpack_from("<I", buf, cur.pos)[0]
            cur.skip_value(vtype, label)
        if alignment == 0 or alignment & (alignment - 1):
            raise cur.fail(f"general.alignment {alignment} is not a power of two")
        table = [_read_tensor_info(cur, i) for i in range(n_tensors)]
        data_start = cur.pos + (-cur.pos) % alignment
        for name, n_elements, qtype, offset in table:
            block, type_size = GGML_QUANT_SIZES[qtype]
            if n_elements % block:
                raise cur.fail(
                    f"tensor {name} has {n_elements} elements, not a multiple of {qtype.name} blocks"
                )
            end = data_start + offset + n_elements // block * type_size
            if end > size:
                raise ModelLoadError(
                    f"{path}: truncated GGUF file: tensor {name} ends at byte {end} but the file has "
                    f"only {size} bytes (incomplete download or copy?)"
                )


def _read_tensor_info(cur: _Cursor, i: int) -> tuple[str, int, GGMLQuantizationType, int]:
    """One tensor-table entry: (name, element count, ggml type, data offset)."""
    name = cur.string(f"tensor #{i} name").decode("utf-8", "replace")
    n_dims = cur.u32(f"tensor {name} dimension count")
    if n_dims > _MAX_DIMS:
        raise cur.fail(f"tensor {name} claims {n_dims} dimensions (at most {_MAX_DIMS})")
    dims = [cur.u64(f"tensor {name} dimensions") for _ in range(n_dims)]
    raw_type = cur.u32(f"tensor {name} type")
    offset = cur.u64(f"tensor {name} offset")
    try:
        qtype = GGMLQuantizationType(raw_type)
    except ValueError:
        raise cur.fail(f"tensor {name} has unknown ggml type id {raw_type}") from None
    if qtype not in GGML_QUANT_SIZES:
        raise cur.fail(f"tensor {name} has ggml type {qtype.name} with no known block size")
    return name, math.prod(dims), qtype, offset
