"""A fixed pool of KV-cache blocks with reference counts and a prefix cache (standard library only)."""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from itertools import repeat, starmap
from operator import itemgetter


class BlockPool:
    """Hands out block ids `0 .. num_blocks - 1` and takes them back; remembers cached content.

    Contract: `allocate(n)` returns `n` distinct block ids with reference count 1, or `None` (and
    changes nothing) when fewer than `n` are available. A released block whose reference count
    reaches zero becomes free; if it holds cached content (`register`ed hash) it stays findable by
    that hash and is *evictable* instead: `allocate` takes empty blocks first, then evicts cached
    ones (oldest release first, or the victim `choose_victim` picks), calling `on_evict(block,
    hash)` for each before handing it out. `retain` adds a reference (reviving an evictable block).
    Releasing a free block raises.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be > 0, got {num_blocks}")
        self.num_blocks = num_blocks
        self._ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        # Cached, unreferenced blocks -> when they were released; oldest first.
        self.evictable: OrderedDict[int, float] = OrderedDict()
        self.block_hash: dict[int, int] = {}
        self.cached: dict[int, int] = {}  # hash -> block
        self.on_evict: Callable[[int, int], None] | None = None
        self.choose_victim: Callable[[], int] | None = None

    @property
    def num_free(self) -> int:
        """Blocks `allocate` can hand out: empty ones plus evictable cached ones."""
        return len(self._free) + len(self.evictable)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def allocate(self, n: int) -> list[int] | None:
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        free = self._free
        if n == 1 and free:  # the common case: a decode's next block
            blocks = [free.popleft()]
        elif n <= len(free):
            blocks = list(starmap(free.popleft, repeat((), n)))  # n poplefts, in C
        elif n > len(free) + len(self.evictable):
            return None
        else:
            blocks = list(free)
            free.clear()
            while len(blocks) < n:
                blocks.append(self.evict_one())
        refs = self._ref_counts
        for b in blocks:
            refs[b] = 1
        return blocks

    def evict_one(self) -> int:
        """Evict one cached unreferenced block (calling `on_evict`) and return it, unowned and
        outside the free list: the caller owns it now."""
        victim = self.choose_victim() if self.choose_victim is not None else next(iter(self.evictable))
        del self.evictable[victim]
        h = self.block_hash.pop(victim)
        del self.cached[h]
        if self.on_evict is not None:
            self.on_evict(victim, h)
        return victim

    def retain(self, block_id: int) -> None:
        count = self._ref_counts[block_id]
        if count <= 0:
            if block_id not in self.evictable:
                raise ValueError(f"block {block_id} is free; it cannot be shared")
            del self.evictable[block_id]
        self._ref_counts[block_id] = count + 1

    def release(self, block_ids: list[int], now: float = 0.0) -> None:
        """Drop one reference to each block; `now` stamps blocks that become evictable."""
        refs, free, hashed = self._ref_counts, self._free, self.block_hash
        if not hashed and len(block_ids) > 1:
            # Nothing cached: when each block has one owner (a finished request's own table) they
            # all go to the free list; the counts are read and the blocks appended in C.
            counts = itemgetter(*block_ids)(refs)
            if counts.count(1) == len(counts):
                for b in block_ids:
                    refs[b] = 0
                free.extend(block_ids)
                return
        for b in block_ids:
            count = refs[b]
            if count == 1:
                refs[b] = 0
                if hashed and b in hashed:
                    self.evictable[b] = now
                else:
                    free.append(b)
            elif count > 1:
                refs[b] = count - 1
            else:
                raise ValueError(f"block {b} released while free (double free)")

    def register(self, block_id: int, h: int) -> bool:
        """Make block `block_id` findable by content hash `h`; False (nothing changes) when another
        block already holds `h` or this block already holds a hash."""
        if h in self.cached or block_id in self.block_hash:
            return False
        self.block_hash[block_id] = h
        self.cached[h] = block_id
        return True

    def uncache(self, block_id: int) -> None:
        """Forget the block's content hash (its content is not to be reused)."""
        h = self.block_hash.pop(block_id, None)
        if h is None:
            return
        del self.cached[h]
        if block_id in self.evictable:
            del self.evictable[block_id]
            self._free.append(block_id)

    def drop_evictable(self, block_id: int) -> int:
        """Take an evictable block out of the cache to the empty list (it moved to another tier);
        returns its hash."""
        del self.evictable[block_id]
        h = self.block_hash.pop(block_id)
        del self.cached[h]
        self._free.append(block_id)
        return h

    def free_block_ids(self) -> set[int]:
        """Blocks with no owner: empty and evictable."""
        return set(self._free) | set(self.evictable)

    def check_invariants(self) -> None:
        empty, evictable = set(self._free), set(self.evictable)
        if len(empty) != len(self._free):
            raise AssertionError("free list holds a block twice")
        if empty & evictable:
            raise AssertionError(f"blocks both empty and evictable: {sorted(empty & evictable)[:5]}")
        if any(b in self.block_hash for b in empty):
            raise AssertionError("an empty block still holds a content hash")
        if not evictable <= set(self.block_hash):
            raise AssertionError("an evictable block holds no content hash")
        if {h: b for b, h in self.block_hash.items()} != self.cached:
            raise AssertionError("hash -> block map disagrees with block -> hash map")
        for b in empty | evictable:
            if self._ref_counts[b] != 0:
                raise AssertionError(f"free block {b} has reference count {self._ref_counts[b]}")
