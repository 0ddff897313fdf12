"""Greedy agreement of the GPU fast path with the torch reference backend on a 1B-size model in bf16 (issue 15's
GPU test: >= 99% of greedy tokens).

The fast engine (Triton attention, CUDA graphs for prefill and decode, overlap scheduling) generates greedy
continuations; the reference engine (torch attention backend, eager, no overlap) then reads each prompt plus that
continuation in one prefill and reports its own top-1 token at every generated position. Agreement is the share of
positions where the two top-1 tokens are the same. Comparing on the same prefix (teacher forcing) counts each
disagreement once, where free-running generation would count every token after the first split.

Random weights give flat next-token distributions: where the reference's top-1 and top-2 log-probs lie closer than
bf16 rounding, either token is a correct answer. The script prints the agreement over every position, how many
disagreements had such a margin, and the agreement over the positions where the reference's choice is clear
(top-2 gap >= --tie-margin); it fails when that is under the threshold.

    python scripts/backend_agreement.py --preset llama-3.2-1b --tokenizer-dir .gpu/tokenizer
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import torch

from mmserve.bench.presets import write_preset
from mmserve.config import ServerArgs
from mmserve.engine_core import EngineCore
from mmserve.messages import GenerateRequest


def run(core: EngineCore, requests: list[GenerateRequest]) -> dict[str, dict]:
    for req in requests:
        core.handle(req)
    results: dict[str, dict] = {r.rid: {"tokens": [], "input_top": []} for r in requests}
    while core.has_work():
        for out in core.step():
            assert out.error_status is None, out.finished_reason
            res = results[out.rid]
            res["tokens"].extend(out.new_token_ids)
            res["input_top"].extend(out.input_top_logprobs or [])
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-3.2-1b")
    parser.add_argument("--tokenizer-dir", type=Path)
    parser.add_argument("--model-path", help="a model folder instead of a preset (e.g. a tiny one, on the CPU)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=100)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--threshold", type=float, default=0.99)
    parser.add_argument("--tie-margin", type=float, default=0.05,
                        help="a reference top-1/top-2 log-prob gap under this counts as a near tie")
    args = parser.parse_args()
    if args.model_path:
        folder, name = Path(args.model_path), Path(args.model_path).name
    else:
        name = args.preset
        folder = write_preset(name, args.tokenizer_dir, Path(tempfile.mkdtemp()) / name)
    rng = random.Random(0)
    # a KV cache of a fixed size, so that the reference engine fits beside what the fast one leaves allocated
    common = {"model_path": str(folder), "load_format": "dummy", "dtype": args.dtype, "device": args.device,
              "max_total_tokens": 32768}
    fast = EngineCore(ServerArgs(**common, attention_backend="triton"))
    vocab = fast.model_config.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(args.input_len + rng.randrange(-40, 40))]
               for _ in range(args.prompts)]
    greedy = {"temperature": 0, "max_new_tokens": args.output_len, "ignore_eos": True}
    # in batches of 1, 4 and the rest together: graphs of several sizes, prefill graphs and eager prefill
    generated: dict[str, list[int]] = {}
    for group in (prompts[:1], prompts[1:5], prompts[5:]):
        start = len(generated)
        out = run(fast, [GenerateRequest(f"p{start + i}", ids, greedy) for i, ids in enumerate(group)])
        generated.update({rid: r["tokens"] for rid, r in out.items()})
    stats = fast.scheduler.stats
    runner = fast.runner
    print(f"fast engine: {stats.steps} steps, graphs: decode {'on' if runner.graph_runner else 'off'}, "
          f"prefill {'on' if runner.prefill_graph_runner else 'off'}")
    del fast
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    ref = EngineCore(ServerArgs(**common, attention_backend="torch", disable_cuda_graph=True,
                                disable_overlap_schedule=True))
    scored = {"temperature": 0, "max_new_tokens": 1, "ignore_eos": True, "top_logprobs_num": 2}
    out = run(ref, [GenerateRequest(f"p{i}", ids + generated[f"p{i}"], scored, logprob_start_len=len(ids))
                    for i, ids in enumerate(prompts)])
    agree = total = near_ties = decisive = decisive_agree = 0
    for i in range(len(prompts)):
        tokens = generated[f"p{i}"]
        # input_top[j] scores the token at position len(prompt) + j from the logits one position earlier
        tops = out[f"p{i}"]["input_top"]
        assert len(tops) == len(tokens), (len(tops), len(tokens))
        for token, top in zip(tokens, tops, strict=True):
            total += 1
            margin = top[0][1] - top[1][1]
            agree += top[0][0] == token
            near_ties += top[0][0] != token and top[1][0] == token and margin < args.tie_margin
            if margin >= args.tie_margin:  # the reference's choice is clear by more than bf16 noise
                decisive += 1
                decisive_agree += top[0][0] == token
    share = decisive_agree / max(1, decisive)
    print(f"{name} {args.dtype}: {agree}/{total} greedy tokens agree ({100 * agree / total:.2f}%); of the "
          f"{total - agree} that differ, {near_ties} are the reference's second choice within {args.tie_margin} "
          f"nats; where the reference's top two lie {args.tie_margin} nats or more apart: {decisive_agree}/"
          f"{decisive} agree ({100 * share:.2f}%, threshold {100 * args.threshold:.0f}%)")
    return 0 if share >= args.threshold else 1


if __name__ == "__main__":
    sys.exit(main())
