"""Offline throughput and single-stream latency: sagellm vs Hugging Face transformers, side by side.

Both run the same SmolLM2-135M GGUF weights in the same dtype on the same threads, in one process,
alternating runs so that machine noise hits both alike. Reports medians over repeats and the ratio.

    .venv/bin/python benchmarks/throughput.py --dtype float32
    .venv/bin/python benchmarks/throughput.py --dtype bfloat16 --num-requests 64
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def load_transformers(dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    from sagellm.models.paths import default_model_path

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    model.eval()
    return model


def make_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    # Ordinary token ids (skip the first 200: special and byte tokens).
    return [[rng.randrange(200, vocab) for _ in range(length)] for _ in range(n)]


def hf_batch(model, prompts: list[list[int]], new_tokens: int) -> float:
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, pad_token_id=0,
        )
    dt = time.perf_counter() - t0
    assert out.shape[1] == ids.shape[1] + new_tokens
    return dt


def sage_batch(engine, prompts: list[list[int]], new_tokens: int) -> float:
    from sagellm.engine import GenerateRequest

    reqs = [
        GenerateRequest(prompt_token_ids=p, max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        for p in prompts
    ]
    t0 = time.perf_counter()
    outs = engine.generate_batch(reqs)
    dt = time.perf_counter() - t0
    assert all(len(o.token_ids) == new_tokens for o in outs), [o.finish_reason for o in outs]
    return dt


def hf_single(model, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(TTFT, time per output token after the first) from two timed generate calls."""
    t1 = hf_batch(model, [prompt], 1)
    tn = hf_batch(model, [prompt], new_tokens)
    return t1, (tn - t1) / (new_tokens - 1)


def sage_single(engine, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    from sagellm.engine import GenerateRequest

    out = engine.generate(
        GenerateRequest(prompt_token_ids=prompt, max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    )
    return out.metrics.ttft, out.metrics.tpot


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--single-output-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--skip-hf", action="store_true", help="measure sagellm only")
    args = ap.parse_args()

    from sagellm import SageLLMConfig
    from sagellm.engine import SageLLMEngine

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} threads, dtype {args.dtype}")
    print(f"# command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")

    config = SageLLMConfig.from_dict({
        "model": {"dtype": args.dtype, "max_model_len": 2048},
        "scheduler": {"max_num_seqs": max(64, args.num_requests), "max_num_batched_tokens": 512},
        "kv_cache": {"memory_gb": 2.0},
        "backend": {"num_threads": args.threads},
    })
    engine = SageLLMEngine(config).initialize()
    hf = None if args.skip_hf else load_transformers(dtype)
    vocab = engine.shape.vocab_size
    batch = make_prompts(args.num_requests, args.prompt_len, vocab, seed=0)
    single = make_prompts(1, args.prompt_len, vocab, seed=1)[0]

    # Warm-up: a short run of each, so first-run effects (allocation, oneDNN kernel choice) do not count.
    sage_batch(engine, batch[:4], 8)
    if hf is not None:
        hf_batch(hf, batch[:4], 8)

    total_out = args.num_requests * args.output_len
    sage_t, hf_t = [], []
    sage_s, hf_s = [], []
    for rep in range(args.repeats):
        sage_t.append(sage_batch(engine, batch, args.output_len))
        sage_s.append(sage_single(engine, single, args.single_output_len))
        if hf is not None:
            hf_t.append(hf_batch(hf, batch, args.output_len))
            hf_s.append(hf_single(hf, single, args.single_output_len))
        print(f"  repeat {rep + 1}: sagellm {total_out / sage_t[-1]:.1f} tok/s"
              + (f", transformers {total_out / hf_t[-1]:.1f} tok/s" if hf_t else ""), flush=True)
    engine.shutdown()

    def med(xs):
        return statistics.median(xs)

    print()
    print(f"Offline throughput: {args.num_requests} requests x {args.prompt_len} prompt + "
          f"{args.output_len} output tokens (ignore_eos), median of {args.repeats}")
    s_tp = total_out / med(sage_t)
    print(f"  sagellm       {s_tp:8.1f} output tok/s   ({med(sage_t):.2f} s)")
    if hf_t:
        h_tp = total_out / med(hf_t)
        print(f"  transformers  {h_tp:8.1f} output tok/s   ({med(hf_t):.2f} s)")
        print(f"  ratio sagellm / transformers: {s_tp / h_tp:.2f}x")
    print(f"Single request: {args.prompt_len} prompt tokens, {args.single_output_len} output tokens")
    s_ttft, s_tpot = med([x[0] for x in sage_s]), med([x[1] for x in sage_s])
    print(f"  sagellm       TTFT {s_ttft * 1000:7.1f} ms   decode {s_tpot * 1000:6.1f} ms/token")
    if hf_s:
        h_ttft, h_tpot = med([x[0] for x in hf_s]), med([x[1] for x in hf_s])
        print(f"  transformers  TTFT {h_ttft * 1000:7.1f} ms   decode {h_tpot * 1000:6.1f} ms/token")
        print(f"  decode speed ratio sagellm / transformers: {h_tpot / s_tpot:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
