"""Time to first token for prompt lengths the engine has not seen before, against the same lengths seen once
(issue 15's T1'): no per-shape work may sit on the request path.

    python -m mmserve.bench.ttft --preset llama-3.1-8b --tokenizer-dir DIR

In-process `Engine`, one request at a time, `max_new_tokens=1`, random prompts with no shared prefix (the radix
cache never helps). Every length is measured twice: first unseen, then again with a fresh prompt of that length.
"""

from __future__ import annotations

import argparse
import random
import statistics

from mmserve.bench.presets import add_preset_args, apply_preset
from mmserve.config import ServerArgs

_LENGTHS = (97, 131, 203, 389, 517, 777, 1003, 1531, 2049, 3001)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default=",".join(map(str, _LENGTHS)), help="Prompt lengths, comma-separated.")
    parser.add_argument("--seed", type=int, default=0)
    add_preset_args(parser)
    ServerArgs.add_cli_args(parser)
    args = parser.parse_args(argv)
    apply_preset(args, parser)
    server_args = ServerArgs.from_cli_args(args)
    lengths = [int(x) for x in args.lengths.split(",")]

    import torch

    from mmserve.bench.fastpath import ttft as request_seconds
    from mmserve.engine import Engine

    rng = random.Random(args.seed)
    rows = []
    with Engine(**vars(server_args)) as engine:
        vocab = min(engine.model_config.vocab_size, 32000)

        def ttft(n: int) -> float:
            return 1000 * request_seconds(engine, [rng.randrange(100, vocab) for _ in range(n)])

        ttft(64)  # the engine's own first-call costs, at a length not measured below
        for n in lengths:
            first = ttft(n)
            again = ttft(n)
            rows.append((n, first, again))
        device = engine.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\nmodel {args.preset or server_args.model_path} | device {name} | attention {server_args.attention_backend}"
          " | TTFT ms, max_new_tokens=1, one request at a time")
    print(f"{'prompt tokens':>14}{'unseen length':>16}{'seen length':>14}{'ratio':>8}")
    for n, first, again in rows:
        print(f"{n:>14}{first:>16.1f}{again:>14.1f}{first / again:>8.2f}")
    print(f"median ratio unseen / seen: {statistics.median(f / a for _, f, a in rows):.2f}")


if __name__ == "__main__":
    main()
