"""Constrained decoding's cost (issue 18): decode throughput of a batch with and without a JSON schema, on a real
architecture's shape with random weights.

    python scripts/bench_structured.py --preset llama-3.1-8b --tokenizer-dir .gpu/tokenizer [--batch 64]

Every request samples at temperature 1 and generates exactly --output-len tokens: the schema (an array of at
least 10,000 integers) cannot be complete sooner, so both runs do the same work. Prints output tok/s, the median of
--runs, for: no grammar (the step loop's overlap scheduling on), and the schema (each step fills the rows' masks
on the host and waits for the sampled ids before the next)."""

from __future__ import annotations

import argparse
import json
import statistics
import time

from mmserve import Engine
from mmserve.bench.presets import add_preset_args, apply_preset

SCHEMA = {"type": "array", "items": {"type": "integer"}, "minItems": 10000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_preset_args(parser)
    parser.add_argument("--model-path")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    apply_preset(args, parser)
    kwargs = {"model_path": args.model_path}
    if args.preset:
        kwargs["load_format"] = "dummy"
    prompts = [f"Item {i}: list the numbers you know, as JSON." for i in range(args.batch)]
    base = {"temperature": 1.0, "max_new_tokens": args.output_len, "ignore_eos": True}
    rows = {}
    with Engine(**kwargs) as engine:
        for label, extra in (("no grammar", {}), ("JSON schema", {"json_schema": json.dumps(SCHEMA)})):
            params = {**base, **extra}
            engine.generate(prompts, params)  # warm-up (and the schema's compilation)
            rates = []
            for _ in range(args.runs):
                start = time.perf_counter()
                outs = engine.generate(prompts, params)
                seconds = time.perf_counter() - start
                tokens = sum(len(o["output_ids"]) for o in outs)
                assert tokens == args.batch * args.output_len, f"{tokens} tokens, wanted every request to run out"
                rates.append(tokens / seconds)
            if extra:
                json.loads(outs[0]["text"] + "1]")  # an unfinished array of integers: closing it parses
            rows[label] = rates
    free = statistics.median(rows["no grammar"])
    print(f"batch {args.batch}, {args.output_len} tokens each, temperature 1, median of {args.runs}")
    for label, rates in rows.items():
        rate = statistics.median(rates)
        print(f"{label:12s} {rate:10,.0f} output tok/s [{min(rates):,.0f}-{max(rates):,.0f}]  "
              f"{100 * (1 - rate / free):5.1f}% below no grammar")


if __name__ == "__main__":
    main()
