"""Issue 17's and issue 20's rows, one model family a run: offline throughput of requests with one image each, and
the time to first token of one such request alone, at a real model's shape (a preset: random weights), each beside
transformers' `generate` on the same checkpoint in the same process.

    python -m mmserve.bench.families --preset llava-1.5-7b --tokenizer-dir DIR [--requests 64] [--runs 3] [--no-hf]

(also gemma-3-12b, mistral-small-3.1-24b, internvl3-8b, glm-4.1v-9b, llama-3.2-11b-vision, phi-4-multimodal,
qwen3-omni-30b-a3b, glm-4.5v, or any vision-language --model-path). GLM-4.5V's 108B parameters (216 GB in bf16) do
not fit one GPU: its preset keeps the real shape and a run cuts the depth, e.g. --config-override
'{"text_config": {"num_hidden_layers": 12}}' (28B, 52 GiB). Every prompt is one user turn of one image and
--text-words random words, rendered by the checkpoint's chat template, so each family gets its own placeholder
(`<image>`, `<start_of_image>`, `[IMG]`, `<IMG_CONTEXT>`, GLM's `<|image|>` between its begin/end tokens, Llama 3.2
Vision's single `<|image|>` whose tiles only the cross-attention layers read, Phi-4's `<|image|>`, Qwen-VL's
`<|image_pad|>`); the same text and images go to mmserve and to transformers' processor, and both sides' times
include the processor. Images are new random pixels every time, so no cache helps. Each mmserve figure is the median
of --runs runs, with min-max beside it; requests are greedy and ignore EOS. The transformers rows (--hf-runs each,
none with --no-hf) run after the engine is shut down and its memory freed (a 24B model in bf16 is 48 GB: the two
never share the GPU).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from typing import Any

from mmserve.bench.fastpath import (
    Figure,
    Row,
    add_table_args,
    build_table,
    device_name,
    floor_row,
    greedy,
    parse_only,
    parse_table_args,
    report,
    start_table,
    sync,
    ttft,
)
from mmserve.bench.multimodal import (
    IMAGE,
    HFRunner,
    MediaSource,
    hf_throughput,
    measure_offline,
    offline_requests,
    with_engine,
)
from mmserve.bench.offline import say
from mmserve.config import ServerArgs

# floor: the GPU's copy bandwidth over the weights' bytes; F1: offline throughput; F2: time to first token
ROW_IDS = ("floor", "F1", "F2")
NOTES: list[tuple[set[str], str]] = [
    (set(), "floor: one large device-to-device copy timed with CUDA events (host copy on the CPU), read + write "
            "bytes, over the bytes of the engine's parameters (the vision tower's included)"),
    (set(), "every time includes the processor; images are new random pixels, so no cache helps; prompts are the "
            "family's chat template around one image and the words"),
    ({"F1"}, "F1: requests / wall seconds of one generate call with every prompt; transformers: batches of "
             "--hf-batch-size (left-padded), one after another"),
    ({"F2"}, "F2: ms to the one output token of a single request, median over --ttft-images new images; "
             "transformers: the same"),
    (set(), "vs transformers: times faster (our rate over theirs; for times, theirs over ours)"),
]


def chat_layout(model_path: str) -> str:
    """The checkpoint's chat template rendered around one user turn of an image then "{text}": the prompt each
    request fills with its words, the family's image placeholder in it."""
    from transformers import AutoTokenizer

    from mmserve.models.loader import resolve_model_path, split_gguf

    folder, _ = split_gguf(resolve_model_path(model_path))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "{text}"}]}]
    layout = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert layout.count("{text}") == 1, layout
    return layout


def measure_ttft(run: Any, args: argparse.Namespace, media: MediaSource, runs: int) -> Figure:
    """Per run, the median over --ttft-images new images of `run(prompt, image)` in milliseconds."""
    medians = []
    for i in range(runs):
        ms = [1000 * run(media.prompt(IMAGE, args.text_words), media.image(args.image_size))
              for _ in range(args.ttft_images)]
        medians.append(statistics.median(ms))
        say(f"  run {i + 1}: median {medians[-1]:.1f} ms [{min(ms):.1f}–{max(ms):.1f}]")
    return Figure(medians)


def run_mmserve(args: argparse.Namespace, server_args: ServerArgs, only: set[str], floor_bw: Figure,
                layout: str) -> tuple[dict[str, Row], dict[str, Any]]:
    def measure(engine: Any) -> tuple[dict[str, Row], dict[str, Any]]:
        media = MediaSource(args.seed, layout)
        rows = {"floor": floor_row(engine, floor_bw)}
        say("mmserve: warm-up")
        out = engine.generate(media.prompt(IMAGE, args.text_words), greedy(2),
                              image_data=media.image(args.image_size))
        tokens = out["meta_info"]["prompt_tokens"]
        if "F1" in only:  # the whole batch, so its allocations are made before anything is timed
            offline_requests(engine, args, media, "warm-up", output_len=4)
            rows["F1"] = measure_offline(engine, args, media, tokens, row_id="F1")
        if "F2" in only:
            say(f"F2: time to first token, one request with a new {args.image_size[0]}x{args.image_size[1]} image, "
                f"median of {args.ttft_images}, {args.runs} runs")
            figure = measure_ttft(lambda prompt, image: ttft(engine, prompt=prompt, image_data=image), args, media,
                                  args.runs)
            rows["F2"] = Row("F2", f"one request alone, one {args.image_size[0]}x{args.image_size[1]} image + "
                             f"{args.text_words} words, time to first token (median of {args.ttft_images} images)",
                             "ms", figure, higher_is_better=False, detail=f"{tokens} prompt tokens",
                             extra={"prompt_tokens": tokens})
        sync(engine.device)
        env = {"device": device_name(engine.device),
               "dtype": str(engine.model_config.dtype).removeprefix("torch.")}
        return rows, env

    return with_engine(args, server_args, measure)


def run_hf(args: argparse.Namespace, server_args: ServerArgs, only: set[str], layout: str) -> dict[str, Figure]:
    hf = HFRunner(server_args)
    media = MediaSource(args.seed + 1, layout)
    batch = min(args.hf_batch_size, args.v1_prompts)
    say("transformers: warm-up")
    for size in (1, batch):
        hf.generate([media.prompt(IMAGE, args.text_words) for _ in range(size)], 2,
                    images=[media.image(args.image_size) for _ in range(size)])
    figures: dict[str, Figure] = {}
    if "F1" in only:
        num = min(args.v1_prompts, args.hf_requests or args.v1_prompts)
        figures["F1"] = hf_throughput(hf, args, media, num, batch, "F1")
    if "F2" in only:
        say(f"transformers F2: time to first token, median of {args.ttft_images} images, {args.hf_runs} runs")
        figures["F2"] = measure_ttft(lambda prompt, image: hf.generate([prompt], 1, images=[image]), args, media,
                                     args.hf_runs)
    hf.close()
    return figures


def _size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    return int(width), int(height)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_table_args(parser, f"Rows to run, comma-separated, from {', '.join(ROW_IDS)} (default: all; floor always "
                   "runs).", 16, "F1")
    counts = [("requests", 64), ("output-len", 64), ("text-words", 30), ("ttft-images", 5)]
    for name, default in counts:
        parser.add_argument(f"--{name}", type=int, default=default, help=f"(default: {default})")
    parser.add_argument("--hf-requests", type=int, default=None,
                        help="Time transformers on only the first N of F1's requests (its rate; default: all).")
    parser.add_argument("--image-size", type=_size, default=(448, 448), metavar="WxH",
                        help="Every image's width x height (default: 448x448).")
    args = parse_table_args(parser, argv, counts)
    # the names bench.multimodal's throughput helpers read
    args.v1_prompts, args.v1_output_len = args.requests, args.output_len
    only = parse_only(args.only, parser, ROW_IDS, aliases={})
    server_args, bandwidth = start_table(args, parser)
    layout = chat_layout(server_args.model_path)
    say(f"prompt: {layout!r}")
    rows, env = run_mmserve(args, server_args, only, bandwidth, layout)
    if not args.no_hf and only - {"floor"}:
        for row_id, figure in run_hf(args, server_args, only, layout).items():
            rows[row_id].hf = figure

    ordered = [rows[r] for r in ROW_IDS if r in rows]
    cells, records = build_table(ordered, args.no_hf, {}, hf_row_ids=ROW_IDS[1:])
    command = shlex.join(["python", "-m", "mmserve.bench.families",
                          *(sys.argv[1:] if argv is None else argv)])
    notes = [text for ids, text in NOTES if not ids or ids & set(rows)] + [f"command: {command}"]
    report(args, server_args, env, cells, records, notes)


if __name__ == "__main__":
    main()
