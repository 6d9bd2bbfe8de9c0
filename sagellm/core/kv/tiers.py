"""Names shared by the KV runtime: storage tiers, granularities and the KV operations a step carries.

Standard library only. Operations are plain frozen data so a `SchedulerOutput` stays loggable.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from sagellm.core.policies.eviction import make_eviction_policy


class StorageTier(str, enum.Enum):
    """Where KV blocks can live: the device pool, host memory, a file-backed store."""

    HBM = "hbm"
    DDR = "ddr"
    NVME = "nvme"


class KVGranularity(str, enum.Enum):
    """The unit the KV runtime reuses and moves.

    `BLOCK`: prefix reuse and tier migration per block. `REQUEST`: in addition, a preempted
    request's blocks are swapped out to DDR and back instead of recomputed. `LAYER`: KV is moved
    layer by layer, overlapped with compute (the prefill/decode hand-off); within one worker it
    behaves as `BLOCK`.
    """

    BLOCK = "block"
    REQUEST = "request"
    LAYER = "layer"


OFFLOAD = "offload"  # copy a block down a tier (cache demotion or request swap-out)
LOAD = "load"  # copy a block up into HBM because a request needs it now (prefix hit or swap-in)
PROMOTE = "promote"  # copy a hot block up a tier ahead of need
DROP = "drop"  # forget a block in a tier; nothing to copy
# fill a device block from a prefill worker's hand-off (src_tier "staging": src_index is the
# block's position in the request's handed-off KV)
RECEIVE = "receive"


@dataclass(frozen=True)
class KVOp:
    """One KV operation to run before a step, in the order given.

    Copy operations (`offload`, `load`, `promote`) copy the content of block `src_index` of tier
    `src_tier` into block `dst_index` of tier `dst_tier`; afterwards the source block is free and
    may be the destination of a later operation of the same step. `drop` forgets `src_index` of
    `src_tier` (`dst_tier` and `dst_index` are None). `request_id` names the request a copy is for
    (a load for its prefix, a swap out or in), None for cache moves; it is informational (the
    engine finds the requests that read a failed block from their block tables).
    """

    kind: str
    src_tier: str
    src_index: int
    dst_tier: str | None = None
    dst_index: int | None = None
    request_id: str | None = None

    def to_dict(self) -> dict:
        return {"kind": self.kind, "src_tier": self.src_tier, "src_index": self.src_index,
                "dst_tier": self.dst_tier, "dst_index": self.dst_index, "request_id": self.request_id}


def check_tiering_fields(eviction_policy: str, cold_timeout_s: float | None, hot_access_threshold: int,
                         max_promotions_per_step: int, eviction_policy_args: dict[str, Any] | None = None) -> None:
    """ValueError "<field>: ..." for the first tiering setting out of range (shared with `KVCacheConfig`)."""
    make_eviction_policy(eviction_policy, eviction_policy_args, "eviction_policy")
    if cold_timeout_s is not None and cold_timeout_s <= 0:
        raise ValueError(f"cold_timeout_s: must be > 0 or null, got {cold_timeout_s}")
    if hot_access_threshold < 1:
        raise ValueError(f"hot_access_threshold: must be >= 1, got {hot_access_threshold}")
    if max_promotions_per_step < 0:
        raise ValueError(f"max_promotions_per_step: must be >= 0, got {max_promotions_per_step}")


@dataclass(frozen=True)
class KVPolicy:
    """KV-runtime settings the policy layer acts on (built from `KVCacheConfig`).

    `enable_prefix_caching` reuses full blocks across requests by chained token hashes; with
    `tenant_isolation` a request reuses only blocks computed for its own tenant. `ddr_blocks` and
    `nvme_blocks` size the lower tiers (0 disables a tier); they hold cached prefix blocks evicted
    from HBM, picked by `eviction_policy` (a name in `EVICTION_POLICIES` or 'package.module:Class',
    built with `eviction_policy_args`). An unreferenced cached block idle for
    `cold_timeout_s` seconds moves down a tier ahead of need (None: never); a block hit at least
    `hot_access_threshold` times is hot: it is exempt from the cold timeout and is promoted from
    NVMe to free DDR space, at most `max_promotions_per_step` per step.
    """

    enable_prefix_caching: bool = False
    tenant_isolation: bool = False
    granularity: KVGranularity = KVGranularity.BLOCK
    ddr_blocks: int = 0
    nvme_blocks: int = 0
    eviction_policy: str = "lru"
    cold_timeout_s: float | None = 60.0
    hot_access_threshold: int = 2
    max_promotions_per_step: int = 8
    eviction_policy_args: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "granularity", KVGranularity(self.granularity))
        if self.ddr_blocks < 0 or self.nvme_blocks < 0:
            raise ValueError("ddr_blocks and nvme_blocks must be >= 0")
        check_tiering_fields(self.eviction_policy, self.cold_timeout_s, self.hot_access_threshold,
                             self.max_promotions_per_step, self.eviction_policy_args)
        if (self.ddr_blocks or self.nvme_blocks) and not self.enable_prefix_caching and not self.swaps:
            raise ValueError("ddr/nvme tiers hold cached prefix blocks or swapped requests: enable prefix "
                             "caching or use granularity 'request'")
        if self.swaps and not self.ddr_blocks:
            raise ValueError("granularity 'request' swaps preempted requests to DDR: give ddr blocks")

    @property
    def swaps(self) -> bool:
        return self.granularity is KVGranularity.REQUEST



def op_groups(ops: tuple[KVOp, ...]) -> list[tuple[str, str | None, list[KVOp]]]:
    """Runs of consecutive operations of the same kind of move, as (src tier, dst tier, ops), in
    order: each run of copies is one batched transfer on either side; a drop is a run of its own
    with dst None. A run never reads or writes one index twice, so a batched copy equals the
    operations one by one."""
    groups: list[tuple[str, str | None, list[KVOp]]] = []
    srcs: set[int] = set()  # what the current run reads and writes
    dsts: set[int] = set()
    for op in ops:
        if (op.kind != DROP and groups and groups[-1][0] == op.src_tier and groups[-1][1] == op.dst_tier
                and op.src_index not in srcs and op.dst_index not in dsts):
            groups[-1][2].append(op)
        else:
            groups.append((op.src_tier, op.dst_tier, [op]))
            srcs, dsts = set(), set()
        srcs.add(op.src_index)
        dsts.add(op.dst_index)
    return groups
