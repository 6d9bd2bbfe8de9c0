"""Where one decode step's time goes: the pieces of a real batched decode step, timed one by one.

Serves `--num-requests` requests (128-token prompts) until a step decodes all of them at once,
keeps that step's own inputs (token ids, positions, attention metadata and the KV cache), then
times the whole forward pass, one decoder layer, and each piece of that layer on those inputs in
this thread: median of `--repeats` calls each, after warm-up. Shares are of the whole forward.

    .venv/bin/python benchmarks/decode_step_parts.py --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from sagellm import SageLLMConfig
from sagellm.engine import GenerateRequest, SageLLMEngine
from sagellm.models.attention import paged_attention, write_kv
from sagellm.models.llama import apply_rope, rms_norm


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    with torch.inference_mode():
        for _ in range(3):
            fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def capture_decode_step(engine: SageLLMEngine, num_requests: int) -> tuple:
    """The forward-pass arguments of the first step that decodes all `num_requests` requests."""
    import random

    rng = random.Random(0)
    vocab = engine.shape.vocab_size
    requests = [GenerateRequest(prompt_token_ids=tuple(rng.randrange(200, vocab) for _ in range(128)),
                                max_new_tokens=48, temperature=0.0, ignore_eos=True) for _ in range(num_requests)]
    model = engine.model
    forward = model.forward
    captured: list[tuple] = []

    def spy(token_ids, positions, kv, meta, rows):
        all_decode = not meta.prefills and meta.decode_rows is not None and len(meta.decode_rows) == num_requests
        if all_decode and not captured:
            captured.append((token_ids, positions, kv, meta, rows))
        return forward(token_ids, positions, kv, meta, rows)

    model.forward = spy
    try:
        engine.generate_batch(requests)
    finally:
        model.forward = forward
    if not captured:
        raise RuntimeError(f"no step decoded all {num_requests} requests at once (raise max_num_seqs?)")
    return captured[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    config = SageLLMConfig.from_dict({
        "model": {"dtype": args.dtype, "max_model_len": 2048},
        "scheduler": {"max_num_seqs": args.num_requests, "max_num_batched_tokens": 512},
        "kv_cache": {"memory_gb": 2.0}, "backend": {"num_threads": args.threads},
    })
    with SageLLMEngine(config) as engine:
        token_ids, positions, kv, meta, rows = capture_decode_step(engine, args.num_requests)
        model = engine.model
        layer, s, n = model.layers[0], model.shape, args.num_requests
        with torch.inference_mode():
            hidden = model.embed.index_select(0, token_ids)
            cos, sin = model.rope.tables(positions)
            x = rms_norm(hidden, layer.input_norm, s.rms_norm_eps)
            q, k, v = layer.qkv(x).split([s.q_size, s.kv_size, s.kv_size], dim=-1)
            q = apply_rope(q.view(n, s.num_heads, s.head_dim), cos, sin)
            k_roped = apply_rope(k.view(n, s.num_kv_heads, s.head_dim), cos, sin)
            v = v.reshape(n, s.num_kv_heads, s.head_dim)
            k_cache, v_cache = kv.layer(0)
            att = paged_attention(q, k_roped, v, k_cache, v_cache, meta, layer.scale)
            gate, up = layer.gate_up(x).chunk(2, dim=-1)
            act = F.silu(gate) * up
        per_layer = {
            "two RMSNorms": lambda: (rms_norm(hidden, layer.input_norm, s.rms_norm_eps),
                                     rms_norm(hidden, layer.post_norm, s.rms_norm_eps)),
            "QKV projection": lambda: layer.qkv(x),
            "RoPE on Q and K": lambda: (apply_rope(q, cos, sin),
                                        apply_rope(k.view(n, s.num_kv_heads, s.head_dim), cos, sin)),
            "KV write": lambda: write_kv(k_cache, v_cache, k_roped, v, meta.slot_mapping),
            "paged decode attention": lambda: paged_attention(q, k_roped, v, k_cache, v_cache, meta, layer.scale),
            "O projection + residual": lambda: hidden + layer.o_proj(att.reshape(n, s.q_size)),
            "gate/up projection": lambda: layer.gate_up(x),
            "SiLU-and-mul": lambda: F.silu(gate) * up,
            "down projection + residual": lambda: hidden + layer.down(act),
        }
        whole = median_ms(lambda: model.forward(token_ids, positions, kv, meta, rows), max(5, args.repeats // 3))
        one_layer = median_ms(lambda: layer.forward(hidden, cos, sin, kv.layer(0), meta), args.repeats)
        head = median_ms(lambda: model.lm_head(rms_norm(hidden, model.norm, s.rms_norm_eps)), args.repeats)
        layers = s.num_layers
        print(f"# {args.dtype}, {args.threads} threads, {n} decodes, mean context "
              f"{positions.float().mean().item() + 1:.0f} tokens")
        print(f"{'whole decode forward':32s} {whole:8.2f} ms  100%")
        print(f"{'one decoder layer':32s} {one_layer:8.2f} ms  {layers * one_layer / whole:5.0%} (x{layers})")
        parts = 0.0
        for name, fn in per_layer.items():
            ms = median_ms(fn, args.repeats)
            parts += ms
            print(f"  {name:30s} {ms:8.3f} ms  {layers * ms / whole:5.0%} (x{layers})")
        print(f"  {'rest of the layer':30s} {one_layer - parts:8.3f} ms  {layers * (one_layer - parts) / whole:5.0%} "
              f"(x{layers})")
        print(f"{'final norm + LM head':32s} {head:8.2f} ms  {head / whole:5.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
