"""Paged KV-cache bookkeeping: which blocks each request owns (standard library only)."""

from __future__ import annotations

from sagellm.core.kv.block_pool import BlockPool


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class KVCacheManager:
    """Owns the block pool and every request's block table.

    Contract: `allocate_slots(request_id, num_tokens)` makes the request's table large enough to
    hold `num_tokens` tokens and returns the block ids it added (possibly none), or `None` when the
    pool cannot supply them, in which case nothing changes. `free(request_id)` releases all of the
    request's blocks. Block ids are real indices into the executor's KV tensors.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {block_size}")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self._tables: dict[str, list[int]] = {}

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def capacity_tokens(self) -> int:
        return self.pool.num_blocks * self.block_size

    @property
    def usage(self) -> float:
        """Fraction of blocks in use."""
        return 1.0 - self.pool.num_free / self.pool.num_blocks

    def block_table(self, request_id: str) -> list[int]:
        return list(self._tables.get(request_id, ()))

    def num_slots(self, request_id: str) -> int:
        """Tokens the request's current blocks can hold."""
        return len(self._tables.get(request_id, ())) * self.block_size

    def num_new_blocks_needed(self, request_id: str, num_tokens: int) -> int:
        have = len(self._tables.get(request_id, ()))
        return max(0, blocks_for_tokens(num_tokens, self.block_size) - have)

    def allocate_slots(self, request_id: str, num_tokens: int) -> list[int] | None:
        need = self.num_new_blocks_needed(request_id, num_tokens)
        new_blocks = self.pool.allocate(need)
        if new_blocks is None:
            return None
        self._tables.setdefault(request_id, []).extend(new_blocks)
        return new_blocks

    def free(self, request_id: str) -> None:
        table = self._tables.pop(request_id, None)
        if table:
            # Release in reverse so a request's tail blocks are reused first.
            self.pool.release(table[::-1])

    def owners(self) -> dict[str, list[int]]:
        """A copy of every request's block table (for checks and logging)."""
        return {rid: list(t) for rid, t in self._tables.items()}

    def check_invariants(self) -> None:
        """Raise AssertionError unless each block is free or owned, with exact reference counts."""
        owned: dict[int, int] = {}
        for table in self._tables.values():
            for b in table:
                owned[b] = owned.get(b, 0) + 1
        free = self.pool.free_block_ids()
        if len(free) != self.pool.num_free:
            raise AssertionError("free list holds a block twice")
        for b in range(self.pool.num_blocks):
            refs = self.pool.ref_count(b)
            if b in free:
                if b in owned or refs != 0:
                    raise AssertionError(f"block {b} is free yet owned ({owned.get(b, 0)}) or counted ({refs})")
            elif refs != owned.get(b, 0) or refs == 0:
                raise AssertionError(f"block {b}: ref count {refs} but owned {owned.get(b, 0)} times")
