"""The `sagellm` command line: `generate` streams a chat reply, `info` describes the engine,
`simulate` runs the simulator on a config, `calibrate` profiles this machine for it."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time

from sagellm.config import ConfigError, SageLLMConfig


def _config_from_args(args: argparse.Namespace) -> SageLLMConfig:
    config = SageLLMConfig.from_yaml(args.config) if args.config else SageLLMConfig()
    model: dict = {}
    if args.model is not None:
        model["model_id"] = args.model
    if args.dtype is not None:
        model["dtype"] = args.dtype
    backend: dict = {}
    if args.device is not None:
        backend["device"] = args.device
    if args.threads is not None:
        backend["num_threads"] = args.threads
    return config.replace(model=model, backend=backend)


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with a SageLLMConfig")
    p.add_argument("--model", help="path to a GGUF file or Hugging Face model directory (default: SmolLM2-135M)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, help="torch intra-op threads")


def _cmd_generate(args: argparse.Namespace) -> int:
    from sagellm.engine import GenerateRequest, SageLLMEngine

    if not args.prompt.strip():
        raise ValueError("prompt: must not be empty")
    config = _config_from_args(args)
    sampling = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop or ()),
    )
    if args.raw:
        request = GenerateRequest(prompt=args.prompt, **sampling)
    else:
        request = GenerateRequest(messages=({"role": "user", "content": args.prompt},), **sampling)
    t0 = time.monotonic()
    with SageLLMEngine(config) as engine:
        load_s = time.monotonic() - t0
        stream = engine.generate_stream(request)
        for delta in stream:
            sys.stdout.write(delta.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        out = stream.output
    if out is not None and out.finish_reason == "error":
        print(f"error: {out.error}", file=sys.stderr)
        return 1
    if out is not None and out.metrics is not None and not args.quiet:
        m = out.metrics
        tpot = f"{m.tpot * 1000:.1f} ms" if m.tpot is not None else "n/a"
        print(
            f"[{m.num_prompt_tokens} prompt tokens, {m.num_output_tokens} new tokens, "
            f"finish={out.finish_reason}, TTFT {m.ttft * 1000:.0f} ms, TPOT {tpot}, "
            f"model load {load_s:.1f} s]",
            file=sys.stderr,
        )
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from sagellm.engine import SageLLMEngine

    with SageLLMEngine(_config_from_args(args)) as engine:
        s = engine.get_stats()
    rows = [
        ("backend", s["backend"]),
        ("device", f"{s['device']} ({s['device_name']}, {s['num_threads']} threads)"),
        ("model", f"{s['model']}  [{s['model_path']}]"),
        ("parameters", f"{engine.shape.num_parameters() / 1e6:.1f} M"),
        ("dtype", s["dtype"]),
        ("max_model_len", s["max_model_len"]),
        ("kv blocks", f"{s['kv_num_blocks']} x {s['kv_block_size']} tokens"),
        ("kv capacity", f"{s['kv_capacity_tokens']} tokens ({s['kv_cache_bytes'] / 2**20:.0f} MiB)"),
        ("max_num_seqs", engine.config.scheduler.max_num_seqs),
        ("max_num_batched_tokens", engine.config.scheduler.max_num_batched_tokens),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sagellm", description="sagellm: LLM serving testbed")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate a reply to PROMPT, streamed as it is produced")
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--raw", action="store_true", help="use the prompt as is, without the chat template")
    g.add_argument("--quiet", action="store_true", help="do not print metrics")
    _add_engine_options(g)
    g.set_defaults(func=_cmd_generate)

    i = sub.add_parser("info", help="backend, device, model, dtype and KV capacity")
    _add_engine_options(i)
    i.set_defaults(func=_cmd_info)

    s = sub.add_parser("simulate", help="simulate a workload (SimPy) and print latency and throughput")
    s.add_argument("config", help="simulation YAML (see docs/simulator.md)")
    s.add_argument("--output", help="directory for per-request results (default results/<name>/<UTC time>)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_simulate)

    c = sub.add_parser("calibrate", help="time the live engine on a grid of batch shapes; fit a profiled cost model")
    c.add_argument("--repeats", type=int, default=5, help="timed repeats per batch shape (after 2 warm-ups)")
    c.add_argument("--quick", action="store_true", help="a third of the grid (for tests)")
    c.add_argument("--kv-links", metavar="PROFILE.json",
                   help="only time the engine's KV copies between tiers and store them in this profile")
    c.add_argument("--pd-link", metavar="PROFILE.json",
                   help="only time the prefill-to-decode KV hand-off between two worker processes and store it")
    c.add_argument("--in-situ", metavar="PROFILE.json",
                   help="only time serving steps again (the serving factors) and refit this profile")
    c.add_argument("--in-situ-replicas", type=int, default=1, metavar="N",
                   help="serve the in-situ steps on N engines at once, as a cluster of N workers competes for "
                        "the cores (e.g. 2 for a one-thread profile used by two-worker clusters); default 1")
    c.add_argument("--in-situ-requests", type=int, default=48, metavar="N",
                   help="requests of the in-situ serving run; default 48")
    c.add_argument("--in-situ-runs", type=int, default=1, metavar="N",
                   help="in-situ serving runs (different seeds, each between two speed probes); default 1")
    c.add_argument("--in-situ-rate", type=float, default=1.2, metavar="REQ_PER_S",
                   help="Poisson rate of the in-situ serving run; default 1.2")
    c.add_argument("--in-situ-mode", choices=("hybrid", "time_share", "strict"), default=None,
                   help="with --in-situ: serve under this schedule mode and store its own serving factors, "
                        "which simulations of that mode use (strict: the config's prefill and decode workers); "
                        "default hybrid (the profile's default factors)")
    c.add_argument("--output-dir", help="where to write the profile (default simulator/hardware/profiles)")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.add_argument("--refit", metavar="PROFILE.json", help="fit an existing profile again from its samples (no timing)")
    _add_engine_options(c)
    c.set_defaults(func=_cmd_calibrate)

    e = sub.add_parser("experiment", help="run a workload on the simulator and the live engine; fidelity report")
    esub = e.add_subparsers(dest="experiment_command", required=True)
    er = esub.add_parser("run", help="run (or resume) an experiment file")
    er.add_argument("file", help="experiment YAML (see docs/experiments.md)")
    er.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run in this folder")
    er.add_argument("--results", default="results", help="results root (default: results)")
    er.add_argument("--resimulate", action="store_true",
                    help="with --resume: run the simulator again on finished points, keep their live runs")
    er.add_argument("--quiet", action="store_true", help="no progress bars")
    er.set_defaults(func=_cmd_experiment)
    return parser


def _cmd_experiment(args: argparse.Namespace) -> int:
    from pathlib import Path

    from experiments.config import ExperimentConfig
    from experiments.runner import RunInterrupted, run_experiment

    cfg = ExperimentConfig.from_yaml(args.file)
    if args.resimulate and not args.resume:
        raise ValueError("--resimulate: needs --resume RUN_DIR (the run whose live measurements to keep)")
    try:
        run_experiment(cfg, Path(args.results), Path(args.resume) if args.resume else None,
                       progress=not args.quiet, resimulate=args.resimulate)
    except RunInterrupted as stop:
        print(f"\nsagellm: {stop}\nresume it with: sagellm experiment run {shlex.quote(args.file)} "
              f"--resume {shlex.quote(str(stop.run_dir))}", file=sys.stderr)
        return 130
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    from simulator.commands import cmd_simulate

    return cmd_simulate(args)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from simulator.commands import cmd_calibrate

    if args.repeats <= 0:
        raise ValueError(f"--repeats: must be > 0, got {args.repeats}")
    return cmd_calibrate(args, _config_from_args(args))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ValueError, RuntimeError) as exc:
        print(f"sagellm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nsagellm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
