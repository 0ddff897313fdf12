"""Offline throughput: N random prompts through the in-process Engine, one table printed at the end (and a line
per phase, and the tokens generated so far every few seconds, on the way).

    python -m mmserve.bench.offline --model-path PATH --num-prompts 64 --input-len 256 --output-len 128

With `--hf-reference`, the same prompts also run through Hugging Face transformers' `generate` (batched,
left-padded) on the same weights and device, for a side-by-side figure. EOS is ignored so every request
generates exactly --output-len tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from mmserve.bench.presets import add_preset_args, apply_preset
from mmserve.config import ServerArgs


def random_prompts(vocab_size: int, num: int, input_len: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    # stay clear of the low ids where special tokens usually live
    return [[rng.randrange(100, vocab_size) for _ in range(input_len)] for _ in range(num)]


_PROGRESS_EVERY_S = 10.0


def say(message: str) -> None:
    print(message, flush=True)


@contextlib.contextmanager
def progress(label: str, done: Callable[[], int], total: int) -> Iterator[None]:
    """Print `label: done/total (percent), seconds` every `_PROGRESS_EVERY_S` from a thread while the body runs,
    so a long run is seen to move; a line each ten seconds costs the measurement nothing."""
    stop = threading.Event()
    start = time.perf_counter()

    def report() -> None:
        while not stop.wait(_PROGRESS_EVERY_S):
            count = done()
            say(f"  {label}: {count}/{total} ({100 * count / max(1, total):.0f}%), "
                f"{time.perf_counter() - start:.0f} s")

    thread = threading.Thread(target=report, name="bench-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def run_mmserve(args: argparse.Namespace, server_args: ServerArgs) -> dict[str, float]:
    from mmserve.engine import Engine

    say(f"mmserve: loading {server_args.model_path}")
    with Engine(**vars(server_args)) as engine:
        prompts = random_prompts(engine.model_config.vocab_size, args.num_prompts, args.input_len, args.seed)
        params = {"temperature": 0, "max_new_tokens": args.output_len, "ignore_eos": True}
        say("mmserve: warm-up (2 prompts, 2 tokens each)")
        engine.generate(input_ids=prompts[:2], sampling_params={**params, "max_new_tokens": 2})
        _sync()
        total = args.num_prompts * args.output_len
        say(f"mmserve: {args.num_prompts} prompts x {args.input_len} tokens in, {args.output_len} out")
        generated_before = engine.scheduler.stats.generated_tokens
        with progress("tokens generated", lambda: engine.scheduler.stats.generated_tokens - generated_before, total):
            start = time.perf_counter()
            outs = engine.generate(input_ids=prompts, sampling_params=params)
            _sync()
            elapsed = time.perf_counter() - start
        vocab = engine.model_config.vocab_size
    generated = sum(len(o["output_ids"]) for o in outs)
    result = {"seconds": elapsed, "output_tok_s": generated / elapsed,
              "total_tok_s": (generated + args.num_prompts * args.input_len) / elapsed, "vocab": vocab}
    # printed now too, so the figure survives a reference run that fails (e.g. out of memory)
    left = f", {torch.cuda.memory_allocated() / 2**30:.1f} GiB still allocated" if torch.cuda.is_available() else ""
    print(f"mmserve: {elapsed:.2f} s, {result['output_tok_s']:.1f} output tok/s{left}", flush=True)
    return result


def hf_auto_class(config: Any) -> type:
    """transformers' auto class for a config: image-text-to-text where transformers lists the family as one, else
    causal LM (text models, and Phi-4-multimodal, whose vision and audio towers transformers files under causal
    LMs)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    listed = config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    return AutoModelForImageTextToText if listed else AutoModelForCausalLM


def load_hf_model(server_args: ServerArgs) -> torch.nn.Module:
    """The transformers model of `server_args` (random weights with --load-format dummy) on its device, of the
    class `hf_auto_class` picks."""
    from mmserve.config import resolve_dtype
    from mmserve.models.loader import load_hf_config, resolve_model_path, split_gguf

    path = resolve_model_path(server_args.model_path)
    device = server_args.resolved_device()
    config = load_hf_config(path)
    dtype = resolve_dtype(server_args.dtype, config, device)
    auto = hf_auto_class(config)
    say(f"transformers: loading {server_args.model_path}")
    if server_args.load_format == "dummy":
        with torch.device(device):
            return auto.from_config(config, dtype=dtype).eval()
    folder, gguf = split_gguf(path)
    return auto.from_pretrained(folder, gguf_file=gguf, dtype=dtype).to(device).eval()


def run_hf(args: argparse.Namespace, server_args: ServerArgs, vocab: int) -> dict[str, float]:
    model = load_hf_model(server_args)
    device = server_args.resolved_device()
    prompts = torch.tensor(random_prompts(vocab, args.num_prompts, args.input_len, args.seed), device=device)
    mask = torch.ones_like(prompts)
    kwargs = dict(do_sample=False, max_new_tokens=args.output_len, min_new_tokens=args.output_len,
                  pad_token_id=0)
    say("transformers: warm-up (2 prompts, 2 tokens each)")
    model.generate(prompts[:2], attention_mask=mask[:2], **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})
    _sync()
    say(f"transformers: {args.num_prompts} prompts in batches of {args.hf_batch_size}")
    finished = 0
    with progress("prompts done", lambda: finished, args.num_prompts):
        start = time.perf_counter()
        for i in range(0, args.num_prompts, args.hf_batch_size):
            batch = prompts[i : i + args.hf_batch_size]
            model.generate(batch, attention_mask=mask[i : i + args.hf_batch_size], **kwargs)
            finished += len(batch)
        _sync()
        elapsed = time.perf_counter() - start
    generated = args.num_prompts * args.output_len
    return {"seconds": elapsed, "output_tok_s": generated / elapsed,
            "total_tok_s": (generated + args.num_prompts * args.input_len) / elapsed}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hf-reference", action="store_true", help="Also time transformers' generate.")
    parser.add_argument("--hf-batch-size", type=int, default=16)
    add_preset_args(parser)
    ServerArgs.add_cli_args(parser)
    args = parser.parse_args(argv)
    # The engine's own lines (weights loading, ready) at --log-level, whose default is not in the namespace
    logging.basicConfig(level=getattr(args, "log_level", ServerArgs.log_level).upper(), format="%(message)s")
    apply_preset(args, parser)
    server_args = ServerArgs.from_cli_args(args)
    ours = run_mmserve(args, server_args)
    rows = [("mmserve", ours)]
    if args.hf_reference:
        rows.append(("transformers generate", run_hf(args, server_args, int(ours["vocab"]))))
    device = server_args.resolved_device()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    model = args.preset or server_args.model_path
    print(f"\nmodel {model} | dtype {server_args.dtype} | device {name} | {args.num_prompts} prompts x "
          f"{args.input_len} in / {args.output_len} out")
    print(f"{'engine':<24}{'seconds':>10}{'output tok/s':>16}{'total tok/s':>16}")
    for label, r in rows:
        print(f"{label:<24}{r['seconds']:>10.2f}{r['output_tok_s']:>16.1f}{r['total_tok_s']:>16.1f}")


if __name__ == "__main__":
    main()
