"""Where a decode step's time goes: wall time per step, GPU time per step, and the top operators of a torch.profiler
trace, for B requests decoding together on `EngineCore` directly (no thread, no HTTP).

    python scripts/profile_step.py --preset llama-3.1-8b --tokenizer-dir .gpu/tokenizer --batch 1 [--disable-cuda-graph]

Prints: wall ms per decode step (median of --steps), the GPU kernel time inside one step (from the trace), their
ratio (how much of the step the GPU is busy), kernels launched per step, and the operator tables.
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import time

import torch

from mmserve.bench.presets import add_preset_args, apply_preset
from mmserve.config import ServerArgs
from mmserve.engine_core import EngineCore
from mmserve.messages import GenerateRequest


def prefill_ms(core: EngineCore, ids: list[int], rid: str) -> float:
    """Wall ms of one request's prefill step (max_new_tokens=1: the step samples its only token)."""
    core.handle(GenerateRequest(rid=rid, input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": 1,
                                                                           "ignore_eos": True}))
    start = time.perf_counter()
    core.step()
    elapsed = (time.perf_counter() - start) * 1e3
    while core.has_work():
        core.step()
    return elapsed


def profile_prefill(core: EngineCore, rng: random.Random, vocab: int, args: argparse.Namespace) -> None:
    """Prefill of one prompt: a length seen before against new lengths, then a trace of a new length."""
    from torch.profiler import ProfilerActivity, profile

    def prompt(n: int) -> list[int]:
        return [rng.randrange(100, vocab) for _ in range(n)]

    n = args.input_len
    for i in range(3):
        prefill_ms(core, prompt(n), f"warm{i}")
    seen = [prefill_ms(core, prompt(n), f"seen{i}") for i in range(5)]
    unseen = [prefill_ms(core, prompt(n + 3 + 7 * i), f"unseen{i}") for i in range(5)]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        traced = prefill_ms(core, prompt(n + 61), "traced")
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=args.rows))
    print(f"prefill of {n} tokens: seen {statistics.median(seen):.1f} ms (runs {', '.join(f'{t:.1f}' for t in seen)})"
          f" | unseen lengths {statistics.median(unseen):.1f} ms (runs {', '.join(f'{t:.1f}' for t in unseen)})"
          f" | traced unseen {traced:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50, help="decode steps timed")
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--prefill", action="store_true", help="also time and trace one prompt's prefill, for "
                        "lengths seen before and new ones")
    add_preset_args(parser)
    ServerArgs.add_cli_args(parser, in_process=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    apply_preset(args, parser)
    core = EngineCore(ServerArgs.from_cli_args(args))
    rng = random.Random(0)
    vocab = core.model_config.vocab_size
    if args.prefill:
        profile_prefill(core, rng, vocab, args)
    total_steps = args.steps + args.profile_steps + 10
    for i in range(args.batch):
        ids = [rng.randrange(100, vocab) for _ in range(args.input_len)]
        core.handle(GenerateRequest(rid=f"r{i}", input_ids=ids, sampling_params={
            "temperature": 0, "max_new_tokens": total_steps + 5, "ignore_eos": True}))
    sched = core.scheduler
    while sched.waiting or sched.chunked is not None:  # prefill everything
        core.step()
    for _ in range(5):  # warm-up decode
        core.step()
    torch.cuda.synchronize()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        core.step()
        times.append(time.perf_counter() - start)
    wall_ms = statistics.median(times) * 1e3
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.profile_steps):
            core.step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events) / args.profile_steps
    kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA) / args.profile_steps
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.rows))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=args.rows))
    graphs = core.runner.graph_runner is not None
    print(f"\nbatch {args.batch} | input {args.input_len} | CUDA graphs {'on' if graphs else 'off'} | "
          f"{torch.cuda.get_device_name()}")
    print(f"wall per decode step: {wall_ms:.2f} ms ({args.batch * 1e3 / wall_ms:.1f} tok/s) | GPU time per step: "
          f"{gpu_us / 1e3:.2f} ms ({100 * gpu_us / 1e3 / wall_ms:.0f}% busy) | device events per step: {kernels:.0f}")


if __name__ == "__main__":
    main()
