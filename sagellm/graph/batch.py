"""What one step computes, reduced to the numbers that set its cost (standard library only)."""

from __future__ import annotations

from dataclasses import dataclass

from sagellm.core.outputs import SchedulerOutput, batch_totals


@dataclass(frozen=True)
class BatchShape:
    """One step's work, summed over its requests.

    Fields: `num_tokens` new tokens computed; `num_seqs` requests in the step; `num_decodes` of
    them computing exactly one token after a non-empty context; `num_sampled` rows that go through
    the LM head; `attention_pairs` (query, key) pairs under the causal mask, i.e. for a request
    computing n tokens after c cached ones, n*c + n*(n+1)/2; `kv_context_tokens` tokens of K/V each
    request attends to (c + n, summed), which is what attention reads.
    """

    num_tokens: int = 0
    num_seqs: int = 0
    num_decodes: int = 0
    num_sampled: int = 0
    attention_pairs: int = 0
    kv_context_tokens: int = 0

    @classmethod
    def from_chunks(cls, chunks: list[tuple[int, int]] | tuple[tuple[int, int], ...], num_sampled: int | None = None
                    ) -> BatchShape:
        """From (cached context, new tokens) pairs; every request samples unless `num_sampled` says."""
        tokens = pairs = ctx = decodes = 0
        for cached, n in chunks:
            if n <= 0 or cached < 0:
                raise ValueError(f"chunk (context={cached}, tokens={n}) needs tokens > 0 and context >= 0")
            tokens += n
            pairs += n * cached + n * (n + 1) // 2
            ctx += cached + n
            decodes += n == 1 and cached > 0
        return cls(tokens, len(chunks), decodes, len(chunks) if num_sampled is None else num_sampled, pairs, ctx)

    @classmethod
    def from_output(cls, out: SchedulerOutput) -> BatchShape:
        return cls(*batch_vector(out))

    def as_vector(self) -> tuple[int, int, int, int, int, int]:
        return (self.num_tokens, self.num_seqs, self.num_decodes, self.num_sampled, self.attention_pairs,
                self.kv_context_tokens)


def batch_vector(out: SchedulerOutput) -> tuple[int, int, int, int, int, int]:
    """The fields of `BatchShape.from_output(out)` as a tuple, without building the object: the
    scheduler's own totals when it filled in `out.batch`, else `batch_totals` of the columns."""
    b = out.batch
    if b is not None:
        return b
    return batch_totals(out.start_positions, out.token_ids, out.samples)
