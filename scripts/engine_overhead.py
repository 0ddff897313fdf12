"""What the in-process `Engine` adds to a request over stepping `EngineCore` directly (issue 15, build item 8:
no more than 1 ms a request).

Both time one request of --input-len random tokens and one output token, one request at a time, median of --runs
after --warm-up requests: `EngineCore` from submission (`handle`) to the step that returns the token, stepped from
the thread that built it; then `Engine.generate` (its scheduler thread, its queues) on a model built the same way.

    python scripts/engine_overhead.py --preset llama-3.1-8b --tokenizer-dir .gpu/tokenizer
    python scripts/engine_overhead.py --model-path FOLDER --device cpu
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time

import torch

from mmserve import Engine
from mmserve.bench.presets import add_preset_args, apply_preset
from mmserve.config import ServerArgs
from mmserve.engine_core import EngineCore
from mmserve.messages import GenerateRequest

ONE_TOKEN = {"temperature": 0, "max_new_tokens": 1, "ignore_eos": True}


def core_ms(core: EngineCore, ids: list[int], rid: str) -> float:
    start = time.perf_counter()
    core.handle(GenerateRequest(rid=rid, input_ids=ids, sampling_params=ONE_TOKEN))
    while True:
        if any(out.rid == rid and out.finished_reason for out in core.step()):
            return (time.perf_counter() - start) * 1e3


def engine_ms(engine: Engine, ids: list[int]) -> float:
    start = time.perf_counter()
    engine.generate(input_ids=ids, sampling_params=ONE_TOKEN)
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_preset_args(parser)
    parser.add_argument("--model-path")
    parser.add_argument("--device", default=None)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warm-up", type=int, default=3)
    args = parser.parse_args()
    apply_preset(args, parser)
    kwargs = {"model_path": args.model_path, "max_total_tokens": 65536}
    if args.preset:
        kwargs["load_format"] = "dummy"
    if args.device:
        kwargs["device"] = args.device
    rng = random.Random(0)

    def prompts(vocab: int) -> list[list[int]]:
        return [[rng.randrange(vocab) for _ in range(args.input_len)] for _ in range(args.warm_up + args.runs)]

    core = EngineCore(ServerArgs(**kwargs))
    ids = prompts(core.model_config.vocab_size)
    direct = [core_ms(core, p, f"r{i}") for i, p in enumerate(ids)][args.warm_up:]
    device = core.runner.device
    del core
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with Engine(**kwargs) as engine:
        ids = prompts(engine.model_config.vocab_size)
        through = [engine_ms(engine, p) for p in ids][args.warm_up:]
    a, b = statistics.median(direct), statistics.median(through)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, {args.input_len} tokens in, 1 out, median of {args.runs}: EngineCore stepped directly "
          f"{a:.2f} ms [{min(direct):.2f}-{max(direct):.2f}], Engine.generate {b:.2f} ms "
          f"[{min(through):.2f}-{max(through):.2f}]; the Engine adds {b - a:+.2f} ms a request")


if __name__ == "__main__":
    main()
