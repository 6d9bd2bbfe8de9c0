"""Chained block hashes over token ids, the identity of a block's KV content (standard library only).

Block i's hash is a 64-bit BLAKE2b digest of the hash of block i-1 and block i's token ids, so
equal hashes mean equal prefixes (a cryptographic hash: a crafted prompt cannot aim at another
request's block, which Python's own `hash` would allow). Every process (engine, simulator, tests)
computes the same values. The root is a per-tenant salt when tenants are isolated: then two tenants
never share a block.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable, Sequence

ROOT_HASH = 0x5A6E11A1


def root_hash(tenant: str, isolated: bool) -> int:
    """The parent of a request's first block: shared by all, or one per tenant."""
    if not isolated:
        return ROOT_HASH
    return int.from_bytes(hashlib.blake2b(tenant.encode(), digest_size=8).digest(), "little")


def block_hash(parent: int, token_ids: Sequence[int]) -> int:
    """The hash of a block of `token_ids` whose preceding block hashed to `parent`."""
    digest = hashlib.blake2b(parent.to_bytes(8, "little") + array("q", token_ids).tobytes(), digest_size=8)
    return int.from_bytes(digest.digest(), "little")


def extend_block_hashes(hashes: list[int], token_slice: Callable[[int, int], tuple[int, ...]],
                        block_size: int, root: int, num_tokens: int) -> list[int]:
    """Append to `hashes` the hashes of the full blocks among the first `num_tokens` tokens that it
    lacks (`token_slice(start, end)` gives the token ids of positions start..end-1); returns `hashes`."""
    parent = hashes[-1] if hashes else root
    for start in range(len(hashes) * block_size, num_tokens - block_size + 1, block_size):
        parent = block_hash(parent, token_slice(start, start + block_size))
        hashes.append(parent)
    return hashes
