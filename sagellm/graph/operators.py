"""The operators of one forward step of a Llama-family model, with FLOPs and bytes moved.

`step_operators(shape, batch, dtype)` lists, for one step, every operator that runs: embedding,
per-layer norms, projections, RoPE, attention, activation, residual adds, the final norm and the LM
head. Each `Operator` says how many FLOPs it does and how many bytes it moves between memory and
the compute units (weights read, activations read and written, KV cache read and written), for
one execution; `count` says how many times it runs in the step (once per layer for layer ops).

Conventions: a multiply-add is 2 FLOPs; weights and KV are read once per step (no reuse across
operators); activations are read from and written to memory once per operator (no fusion). Every
quantity is linear in the fields of `BatchShape`, which the roofline cost model relies on.
"""

from __future__ import annotations

from dataclasses import dataclass

from sagellm.graph.batch import BatchShape
from sagellm.models.shape import ModelShape

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "float8": 1}


def dtype_bytes(dtype: str) -> int:
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}") from None


@dataclass(frozen=True)
class Operator:
    """One operator of a step: `flops` and `bytes` per execution, run `count` times.

    `kind` is "gemm" (weight matmul), "attention", or "elementwise" (norms, RoPE, activation,
    residual adds, embedding lookup); cost models may treat kinds differently.
    """

    name: str
    kind: str
    flops: float
    bytes: float
    count: int = 1

    @property
    def total_flops(self) -> float:
        return self.flops * self.count

    @property
    def total_bytes(self) -> float:
        return self.bytes * self.count


def _gemm(name: str, rows: int, k: int, n: int, b: int, count: int) -> Operator:
    """`rows` x `k` activations times a `k` x `n` weight: read both, write `rows` x `n`."""
    return Operator(name, "gemm", 2.0 * rows * k * n, float(b * (k * n + rows * k + rows * n)), count)


def step_operators(shape: ModelShape, batch: BatchShape, dtype: str) -> list[Operator]:
    """Every operator of one step of `shape` on `batch`, weights, activations and KV in `dtype`."""
    b = dtype_bytes(dtype)
    t, h, i = batch.num_tokens, shape.hidden_size, shape.intermediate_size
    q, kv, layers = shape.q_size, shape.kv_size, shape.num_layers
    qkv_out = q + 2 * kv
    ops = [
        Operator("embedding", "elementwise", 0.0, float(b * t * h * 2)),
        # RMSNorm: square, sum, scale, multiply by weight: ~4 FLOPs per element.
        Operator("input_norm", "elementwise", 4.0 * t * h, float(b * (2 * t * h + h)), layers),
        _gemm("qkv_proj", t, h, qkv_out, b, layers),
    ]
    if shape.attention_bias:
        ops.append(Operator("qkv_bias", "elementwise", float(t * qkv_out), float(b * (2 * t * qkv_out + qkv_out)),
                            layers))
    ops += [
        # RoPE on q and k: per pair of elements 4 multiplies and 2 adds, i.e. 3 FLOPs per element.
        Operator("rope", "elementwise", 3.0 * t * (q + kv), float(b * 2 * t * (q + kv)), layers),
        Operator("kv_write", "elementwise", 0.0, float(b * 2 * t * kv * 2), layers),
        # QK^T and PV: 2 FLOPs per multiply-add, 2 matmuls, over every causal (query, key) pair.
        Operator(
            "attention",
            "attention",
            4.0 * batch.attention_pairs * q,
            float(b * (2 * batch.kv_context_tokens * kv + 2 * t * q)),
            layers,
        ),
        _gemm("o_proj", t, q, h, b, layers),
        Operator("attn_residual", "elementwise", float(t * h), float(b * 3 * t * h), layers),
        Operator("post_attention_norm", "elementwise", 4.0 * t * h, float(b * (2 * t * h + h)), layers),
        _gemm("gate_up_proj", t, h, 2 * i, b, layers),
        # SiLU(gate) * up: ~5 FLOPs per element (exp, add, divide, multiply, multiply).
        Operator("silu_mul", "elementwise", 5.0 * t * i, float(b * 3 * t * i), layers),
        _gemm("down_proj", t, i, h, b, layers),
        Operator("mlp_residual", "elementwise", float(t * h), float(b * 3 * t * h), layers),
        Operator("final_norm", "elementwise", 4.0 * t * h, float(b * (2 * t * h + h))),
    ]
    if batch.num_sampled:
        ops.append(_gemm("lm_head", batch.num_sampled, h, shape.vocab_size, b, 1))
    return ops


def step_totals(shape: ModelShape, batch: BatchShape, dtype: str) -> tuple[float, float]:
    """(FLOPs, bytes) of a whole step."""
    ops = step_operators(shape, batch, dtype)
    return sum(o.total_flops for o in ops), sum(o.total_bytes for o in ops)
