"""A fixed pool of KV-cache blocks with reference counts (standard library only)."""

from __future__ import annotations

from collections import deque


class BlockPool:
    """Hands out block ids `0 .. num_blocks - 1` and takes them back.

    Contract: `allocate(n)` returns `n` distinct free block ids with reference count 1, or `None`
    (and changes nothing) when fewer than `n` are free. `release` decrements reference counts and
    returns a block to the free list when its count reaches zero. Releasing a free block raises.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be > 0, got {num_blocks}")
        self.num_blocks = num_blocks
        self._ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def allocate(self, n: int) -> list[int] | None:
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        if n > len(self._free):
            return None
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self._ref_counts[b] = 1
        return blocks

    def retain(self, block_id: int) -> None:
        if self._ref_counts[block_id] <= 0:
            raise ValueError(f"block {block_id} is free; it cannot be shared")
        self._ref_counts[block_id] += 1

    def release(self, block_ids: list[int]) -> None:
        for b in block_ids:
            count = self._ref_counts[b]
            if count <= 0:
                raise ValueError(f"block {b} released while free (double free)")
            self._ref_counts[b] = count - 1
            if count == 1:
                self._free.append(b)

    def free_block_ids(self) -> set[int]:
        return set(self._free)
