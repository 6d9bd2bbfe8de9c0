"""The scheduler's per-step limits (standard library only)."""

from __future__ import annotations

from dataclasses import dataclass

from sagellm.core.pd import InferenceMode


@dataclass(frozen=True)
class SchedulerLimits:
    """Per-step limits. `max_model_len` caps prompt plus output of one request; a step holds at
    most `max_prefill_batch` prefill rows and `max_decode_batch` decode rows (None: no cap beyond
    `max_num_seqs`). `time_share` makes every step prefill-only or decode-only, with
    `time_share_decode_steps` decode steps between prefill steps while both kinds of work wait.
    `role` is the worker's `InferenceMode` (STANDARD, PREFILL_ONLY or DECODE_ONLY)."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int = 2048
    chunked_prefill: bool = True
    max_prefill_batch: int | None = None
    max_decode_batch: int | None = None
    time_share: bool = False
    time_share_decode_steps: int = 0
    role: InferenceMode = InferenceMode.STANDARD

    def __post_init__(self) -> None:
        if self.role not in (InferenceMode.STANDARD, InferenceMode.PREFILL_ONLY, InferenceMode.DECODE_ONLY):
            raise ValueError(f"role must be standard, prefill_only or decode_only, got {self.role!r}")
        if self.time_share_decode_steps < 0:
            raise ValueError(f"time_share_decode_steps must be >= 0, got {self.time_share_decode_steps}")
        for name in ("max_prefill_batch", "max_decode_batch"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0 or None, got {getattr(self, name)}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                "without chunked_prefill, max_num_batched_tokens "
                f"({self.max_num_batched_tokens}) must be >= max_model_len ({self.max_model_len})"
            )
