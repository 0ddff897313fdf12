"""Time of the tensor-parallel collectives per decode step: B requests decode together on an in-process Engine of
--tp-size ranks under torch.profiler (rank 0's GPU), and the NCCL kernels' time is summed per kind.

    python scripts/profile_tp.py --preset llama-3.1-8b --tokenizer-dir .gpu/tokenizer --tp-size 2 --batch 1 64

Prints, per batch size: wall ms per decode step, GPU kernel ms per step, all-reduce and all-gather ms per step (and
their share of the GPU time), and the count of collectives per step.
"""

from __future__ import annotations

import argparse
import logging
import random
import time

from mmserve import Engine
from mmserve.bench.presets import add_preset_args, apply_preset
from mmserve.config import ServerArgs


def measure(engine: Engine, batch: int, output_len: int, vocab: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    rng = random.Random(batch)
    prompts = [[rng.randrange(100, vocab) for _ in range(64)] for _ in range(batch)]
    params = {"temperature": 0, "max_new_tokens": output_len, "ignore_eos": True}
    engine.generate(input_ids=prompts, sampling_params=params)  # warm: this batch size's graphs and kernels
    steps_before = engine.scheduler.stats.steps
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        engine.generate(input_ids=prompts, sampling_params=params)
        wall = time.perf_counter() - start
    steps = engine.scheduler.stats.steps - steps_before
    kinds = {"all_reduce": [0.0, 0], "all_gather": [0.0, 0], "total": [0.0, 0]}
    for event in prof.events():
        if event.device_type.name != "CUDA":
            continue
        us = event.device_time_total if hasattr(event, "device_time_total") else event.cuda_time_total
        name = event.name.lower()
        kinds["total"][0] += us
        kinds["total"][1] += 1
        if "nccl" in name and "allreduce" in name.replace("_", ""):
            kinds["all_reduce"][0] += us
            kinds["all_reduce"][1] += 1
        elif "nccl" in name and "allgather" in name.replace("_", ""):
            kinds["all_gather"][0] += us
            kinds["all_gather"][1] += 1
    per_step = {k: (v[0] / 1e3 / steps, v[1] / steps) for k, v in kinds.items()}
    return {"batch": batch, "steps": steps, "wall_ms": wall * 1e3 / steps, **per_step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--output-len", type=int, default=64)
    add_preset_args(parser)
    ServerArgs.add_cli_args(parser)
    args = parser.parse_args()
    logging.basicConfig(level="WARNING")
    apply_preset(args, parser)
    server_args = ServerArgs.from_cli_args(args)
    rows = []
    with Engine(**vars(server_args)) as engine:
        vocab = engine.model_config.vocab_size
        for batch in args.batch:
            rows.append(measure(engine, batch, args.output_len, vocab))
    print("\n| tp | batch | steps | wall ms/step | GPU ms/step | all-reduce ms/step (count) | all-gather ms/step "
          "(count) | collectives / GPU |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        total = r["total"][0]
        coll = r["all_reduce"][0] + r["all_gather"][0]
        print(f"| {server_args.tp_size} | {r['batch']} | {r['steps']} | {r['wall_ms']:.2f} | {total:.2f} | "
              f"{r['all_reduce'][0]:.3f} ({r['all_reduce'][1]:.0f}) | {r['all_gather'][0]:.3f} "
              f"({r['all_gather'][1]:.0f}) | {100 * coll / max(total, 1e-9):.1f}% |")


if __name__ == "__main__":
    main()
