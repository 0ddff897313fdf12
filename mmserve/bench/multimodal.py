"""Issue 16's multimodal targets in one table: offline throughput of requests with one image each (V1; V4 on a
mixture-of-experts model), time to first token of one request with a new image across image sizes (V2), batch-1
decode after an image (V3) and time to first token of one video (V5), each against its target and beside
transformers' `generate` on the same weights in the same process.

    python -m mmserve.bench.multimodal --preset qwen2.5-vl-7b --tokenizer-dir DIR [--only V1,V2,V3] [--runs 3]
    python -m mmserve.bench.multimodal --preset qwen3-vl-30b-a3b --tokenizer-dir DIR --only V4

Every prompt is a user turn of one image (or video) and --text-words random words, in Qwen-VL's chat layout. Every
image and video has fresh random pixels, so neither the prefix cache nor the encoder cache ever helps; images go
in as PIL images and videos as frame arrays (taken as sampled at 2 fps), to mmserve and to transformers' processor
alike, and both sides' times include the processor. Each mmserve figure is the median of --runs runs, with min-max
beside it; requests are greedy and ignore EOS. The floor row always runs (V3 is shown as a percentage of it). The
transformers rows (--hf-runs each, none with --no-hf) run after the engine is shut down and its memory freed.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image

from mmserve.bench.fastpath import (
    Figure,
    Row,
    Target,
    add_table_args,
    build_table,
    decode_speed,
    device_name,
    floor_row,
    fmt_number,
    greedy,
    parse_only,
    parse_table_args,
    report,
    start_table,
    sync,
    ttft,
)
from mmserve.bench.offline import load_hf_model, progress, say
from mmserve.config import ServerArgs

T = TypeVar("T")
ROW_IDS = ("floor", "V1", "V2", "V3", "V4", "V5")
# Qwen-VL's placeholders, which the processor expands to one pad token per vision token
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
_WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
          "number group problem fact water room mother area money story month lot right study book word issue "
          "side kind head house service friend father power hour game line end member law car city name").split()


def _v1_met(row: Row) -> bool | None:
    if row.ours.median < 40:
        return False
    return None if row.ratio is None else row.ratio >= 6.0


def _v2_met(row: Row) -> bool:
    return row.ours.median <= 35.0 and row.extra["p99_over_median"]["median"] <= 1.5


TARGETS: dict[str, Target] = {
    "V1": Target("≥ 40 req/s and ≥ 6× transformers", _v1_met),
    "V2": Target("≤ 35 ms, p99 ≤ 1.5× median", _v2_met),
    "V3": Target("≥ 150 tok/s", lambda row: row.ours.median >= 150),
    "V4": Target("≥ 6× transformers", lambda row: None if row.ratio is None else row.ratio >= 6.0),
}


# ----- the workload -----


# a user turn in Qwen-VL's chat layout: {media} becomes the media's placeholder, {text} the words
QWEN_LAYOUT = "<|im_start|>user\n{media}{text}<|im_end|>\n<|im_start|>assistant\n"


class MediaSource:
    """Prompts of random words and images and videos of random pixels, new ones on every call; `layout` is the
    prompt around {media} and {text} (a family's rendered chat template may hold its image placeholder itself)."""

    def __init__(self, seed: int, layout: str = QWEN_LAYOUT):
        self._rng = np.random.default_rng(seed)
        self._words = random.Random(seed)
        self.layout = layout

    def prompt(self, placeholder: str, words: int) -> str:
        text = " ".join(self._words.choice(_WORDS) for _ in range(words))
        return self.layout.replace("{media}", placeholder).replace("{text}", text)

    def image(self, size: tuple[int, int]) -> Image.Image:
        width, height = size
        return Image.fromarray(self._rng.integers(0, 256, (height, width, 3), dtype=np.uint8))

    def video(self, frames: int, size: tuple[int, int]) -> np.ndarray:
        width, height = size
        return self._rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


def size_ladder(smallest: tuple[int, int], largest: tuple[int, int], count: int, step: int,
                seen: set[int]) -> list[tuple[int, int]]:
    """`count` image sizes (width, height), multiples of `step` spread evenly from `smallest` to `largest`, none
    with a number of `step`-px cells (the image's tokens) in `seen`: such a size grows a step in height until it is
    new. The sizes' cell counts are added to `seen`, so each call gives sizes never given before."""
    (w0, h0), (w1, h1) = smallest, largest
    sizes = []
    for i in range(count):
        t = i / max(1, count - 1)
        w = w0 + step * round(t * (w1 - w0) / step)
        h = h0 + step * round(t * (h1 - h0) / step)
        while (w // step) * (h // step) in seen:
            h += step
        seen.add((w // step) * (h // step))
        sizes.append((w, h))
    return sizes


def p99(values: Iterable[float]) -> float:
    return float(np.percentile(list(values), 99))


def _size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    return int(width), int(height)


def _wxh(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def _v2_range(args: argparse.Namespace, step: int) -> tuple[tuple[int, int], tuple[int, int], set[int]]:
    """V2's smallest and largest sizes on `step`, and the cell counts seen before V2 (V1's and V3's image)."""
    def on_step(size: tuple[int, int]) -> tuple[int, int]:
        return max(step, step * round(size[0] / step)), max(step, step * round(size[1] / step))

    seen = {(args.image_size[0] // step) * (args.image_size[1] // step)}
    return on_step(args.v2_smallest), on_step(args.v2_largest), seen


def _throughput_id(hf_config: Any) -> str:
    """V4 for a mixture of experts (the issue's Qwen3-VL-30B-A3B row), V1 otherwise."""
    text = getattr(hf_config, "text_config", hf_config)
    return "V4" if getattr(text, "num_experts", 0) else "V1"


# ----- mmserve -----


def with_engine(args: argparse.Namespace, server_args: ServerArgs, body: Callable[[Any], T]) -> T:
    """`body(engine)` on a vision-language engine, then the engine shut down and its memory freed (what it
    returns must hold no tensors), so a transformers model of the same size fits after it."""
    from mmserve.engine import Engine

    say(f"mmserve: loading {args.preset or server_args.model_path}")
    with Engine(**vars(server_args)) as engine:
        if engine.processor is None:
            raise ValueError(f"{server_args.model_path} is a text model; this benchmark needs a vision-language "
                             "model (e.g. --preset qwen2.5-vl-7b)")
        device = engine.device
        result = body(engine)
    del engine
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        say(f"mmserve: shut down, {torch.cuda.memory_allocated(device) / 2**30:.1f} GiB still allocated")
    return result


def run_mmserve(args: argparse.Namespace, server_args: ServerArgs, only: set[str], floor_bw: Figure
                ) -> tuple[dict[str, Row], dict[str, Any]]:
    return with_engine(args, server_args, lambda engine: _measure_all(engine, args, only, floor_bw))


def _measure_all(engine: Any, args: argparse.Namespace, only: set[str], floor_bw: Figure
                 ) -> tuple[dict[str, Row], dict[str, Any]]:
    media = MediaSource(args.seed)
    device = engine.device
    rows = {"floor": floor_row(engine, floor_bw)}
    tokens = warm_up(engine, args, only, media)
    if "V1" in only:
        row = measure_offline(engine, args, media, tokens["image"])
        rows[row.id] = row
    if "V2" in only:
        rows["V2"] = measure_image_ttft(engine, args, media)
    if "V3" in only:
        rows["V3"] = measure_decode(engine, args, media, rows["floor"].ours)
    if "V5" in only:
        rows["V5"] = measure_video_ttft(engine, args, media, tokens["video"])
    env = {"device": device_name(device), "dtype": str(engine.model_config.dtype).removeprefix("torch.")}
    return rows, env


def warm_up(engine: Any, args: argparse.Namespace, only: set[str], media: MediaSource) -> dict[str, int | None]:
    """Run each measured kind of request once before timing (an image of V2's sizes excepted); returns the prompt
    tokens of a request with one image and of one with the video (None where not run)."""
    say("mmserve: warm-up")
    two = [media.prompt(IMAGE, args.text_words) for _ in range(2)]
    outs = engine.generate(two, greedy(2), image_data=[media.image(args.image_size) for _ in two])
    tokens: dict[str, int | None] = {"image": outs[0]["meta_info"]["prompt_tokens"], "video": None}
    decode_speed(engine, None, min(8, args.v3_output_len), prompt=media.prompt(IMAGE, args.text_words),
                 image_data=media.image(args.image_size))
    if "V1" in only:  # the whole batch, so its allocations are made before anything is timed
        offline_requests(engine, args, media, "warm-up", output_len=4)
    if "V5" in only:
        out = engine.generate(media.prompt(VIDEO, args.text_words), greedy(1),
                              video_data=media.video(args.video_frames, args.video_size))
        tokens["video"] = out["meta_info"]["prompt_tokens"]
    sync(engine.device)
    return tokens


def offline_requests(engine: Any, args: argparse.Namespace, media: MediaSource, label: str,
                     output_len: int | None = None) -> dict[str, float]:
    """V1's prompts, each with a new image, submitted in one `generate` call (--v1-output-len tokens each, unless
    `output_len`): requests per second over its wall time, the images' processing included."""
    num, output_len = args.v1_prompts, output_len or args.v1_output_len
    prompts = [media.prompt(IMAGE, args.text_words) for _ in range(num)]
    images = [media.image(args.image_size) for _ in range(num)]
    stats = engine.scheduler.stats
    before = (stats.generated_tokens, stats.retractions)
    with progress(f"{label} tokens generated", lambda: stats.generated_tokens - before[0], num * output_len):
        sync(engine.device)
        start = time.perf_counter()
        outs = engine.generate(prompts, greedy(output_len), image_data=images)
        sync(engine.device)
        seconds = time.perf_counter() - start
    generated = sum(len(o["output_ids"]) for o in outs)
    assert generated == num * output_len, f"asked for {num * output_len} tokens, got {generated}"
    retracted = stats.retractions - before[1]
    say(f"  {label}: {seconds:.2f} s, {num / seconds:.2f} req/s, {fmt_number(generated / seconds)} output tok/s"
        + (f", {retracted} retractions" if retracted else ""))
    return {"seconds": seconds, "req_s": num / seconds, "output_tok_s": generated / seconds,
            "prompt_tokens_mean": statistics.fmean(o["meta_info"]["prompt_tokens"] for o in outs)}


def measure_offline(engine: Any, args: argparse.Namespace, media: MediaSource, image_tokens: int | None,
                    row_id: str | None = None) -> Row:
    """V1 (V4 on a mixture of experts; `row_id` where given): --runs of `offline_requests`."""
    row_id = row_id or _throughput_id(engine.model_config.hf_config)
    workload = (f"{args.v1_prompts} × (one {_wxh(args.image_size)} image + {args.text_words} words), "
                f"{args.v1_output_len} out, all at once")
    say(f"{row_id}: {workload}")
    runs = [offline_requests(engine, args, media, f"{row_id} run {i + 1}") for i in range(args.runs)]
    return Row(row_id, ("V1 workload: " if row_id == "V4" else "") + workload, "req/s",
               Figure([r["req_s"] for r in runs]), detail=f"{image_tokens} prompt tokens each",
               extra={"output_tok_s": Figure([r["output_tok_s"] for r in runs]).to_json(),
                      "seconds": Figure([r["seconds"] for r in runs]).to_json(),
                      "prompt_tokens_mean": runs[0]["prompt_tokens_mean"]})


def measure_image_ttft(engine: Any, args: argparse.Namespace, media: MediaSource) -> Row:
    """V2: per run, the time to first token of one request with a new image of each of --v2-sizes sizes not run
    before, each followed by one with a new image of the size V1 and V3 use (seen)."""
    step = _image_step(engine.processor.hf)
    smallest, largest, seen_cells = _v2_range(args, step)
    say(f"V2: time to first token, a new image of {args.v2_sizes} unseen sizes from {_wxh(smallest)} to "
        f"{_wxh(largest)} per run, {args.runs} runs; a new {_wxh(args.image_size)} image (a seen size) after each")
    medians, ratios, seen_ms, all_sizes, all_ms = [], [], [], [], []
    for i in range(args.runs):
        sizes = size_ladder(smallest, largest, args.v2_sizes, step, seen_cells)
        unseen = []
        for size in sizes:
            unseen.append(1000 * ttft(engine, prompt=media.prompt(IMAGE, args.text_words),
                                      image_data=media.image(size)))
            seen_ms.append(1000 * ttft(engine, prompt=media.prompt(IMAGE, args.text_words),
                                       image_data=media.image(args.image_size)))
            say(f"  {_wxh(size)}: {unseen[-1]:.1f} ms; {_wxh(args.image_size)} again: {seen_ms[-1]:.1f} ms")
        medians.append(statistics.median(unseen))
        ratios.append(p99(unseen) / medians[-1])
        all_sizes.append(sizes)
        all_ms.append(unseen)
        say(f"  run {i + 1}: median {medians[-1]:.1f} ms, p99 {p99(unseen):.1f} ms ({ratios[-1]:.2f}× the median)")
    ratio, seen = Figure(ratios), Figure(seen_ms)
    return Row("V2", f"one request, new image, {args.v2_sizes} unseen sizes {_wxh(smallest)}–{_wxh(largest)}, "
               "time to first token (median of the sizes)", "ms", Figure(medians), higher_is_better=False,
               detail=f"p99 {ratio.median:.2f}× median; {_wxh(args.image_size)} again {seen.cell('ms')}",
               extra={"p99_over_median": ratio.to_json(), "seen_size": seen.to_json(), "sizes": all_sizes,
                      "ttft_ms": all_ms})


def measure_decode(engine: Any, args: argparse.Namespace, media: MediaSource, floor: Figure) -> Row:
    """V3: batch-1 decode speed of one streamed request with a new image, as a share of the floor too."""
    say(f"V3: batch 1, one {_wxh(args.image_size)} image + {args.text_words} words, {args.v3_output_len} out, "
        f"{args.runs} runs")
    ttfts, speeds = [], []
    for i in range(args.runs):
        first, speed = decode_speed(engine, None, args.v3_output_len, prompt=media.prompt(IMAGE, args.text_words),
                                    image_data=media.image(args.image_size))
        ttfts.append(first * 1000)
        speeds.append(speed)
        say(f"  run {i + 1}: {speed:.1f} decode tok/s, first token {first * 1000:.1f} ms")
    v3 = Figure(speeds)
    return Row("V3", f"batch 1 after one {_wxh(args.image_size)} image, {args.v3_output_len} out, decode", "tok/s",
               v3, detail=f"{100 * v3.median / floor.median:.0f}% of floor",
               extra={"pct_of_floor": 100 * v3.median / floor.median, "ttft_ms": Figure(ttfts).to_json()})


def measure_video_ttft(engine: Any, args: argparse.Namespace, media: MediaSource, video_tokens: int | None) -> Row:
    """V5: the time to first token of one request with a new video."""
    workload = f"one {args.video_frames}-frame {_wxh(args.video_size)} video + {args.text_words} words"
    say(f"V5: time to first token, {workload}, {args.runs} runs")
    runs = []
    for i in range(args.runs):
        runs.append(1000 * ttft(engine, prompt=media.prompt(VIDEO, args.text_words),
                                video_data=media.video(args.video_frames, args.video_size)))
        say(f"  run {i + 1}: {runs[-1]:.1f} ms")
    return Row("V5", f"{workload}, time to first token", "ms", Figure(runs), higher_is_better=False,
               detail=f"{video_tokens} prompt tokens", extra={"prompt_tokens": video_tokens})


def _image_step(hf_processor: Any) -> int:
    """Pixels per side of one vision token (patch x merge): 28 for Qwen2.5-VL, 32 for Qwen3-VL."""
    image = hf_processor.image_processor
    return int(getattr(image, "patch_size", 14) * getattr(image, "merge_size", 2))


# ----- transformers -----


class HFRunner:
    """transformers' model and processor for the checkpoint; each call times the processor and `generate`."""

    def __init__(self, server_args: ServerArgs):
        from transformers import AutoProcessor

        from mmserve.models.loader import resolve_model_path, split_gguf

        self.model = load_hf_model(server_args)
        self.device = next(self.model.parameters()).device
        folder, _ = split_gguf(resolve_model_path(server_args.model_path))
        self.processor = AutoProcessor.from_pretrained(folder)
        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = "left"  # a batch's prompts end together, where generation starts
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token  # padding a batch needs one; the attention mask hides it
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else 0

    def generate(self, prompts: list[str], new_tokens: int, images: list[Image.Image] | None = None,
                 videos: list[np.ndarray] | None = None) -> float:
        """Seconds to process `prompts` with their media (one image each, or videos) and `generate` exactly
        `new_tokens` greedy tokens for each, as one batch."""
        from mmserve.multimodal.processor import video_metadata

        # frames as given, sampled at 2 fps, as mmserve takes a frame array
        video_kwargs = {"video_metadata": [video_metadata(2.0, len(v), range(len(v))) for v in videos],
                        "do_sample_frames": False} if videos else {}
        sync(self.device)
        start = time.perf_counter()
        # each prompt's images as a list of their own: Gemma 3's processor matches images to prompts by nesting
        nested = [[image] for image in images] if images else None
        inputs = self.processor(text=prompts, images=nested, videos=videos, padding=True, return_tensors="pt",
                                **video_kwargs).to(self.device)
        self.model.generate(**inputs, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                            pad_token_id=self.pad_token_id)
        sync(self.device)
        return time.perf_counter() - start

    def close(self) -> None:
        del self.model
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def hf_batched(hf: HFRunner, args: argparse.Namespace, media: MediaSource, num: int, batch: int) -> float:
    """Seconds for `num` of V1's requests in batches of `batch`, one batch after another."""
    seconds, finished = 0.0, 0
    with progress("prompts done", lambda: finished, num):
        while finished < num:
            part = min(batch, num - finished)
            seconds += hf.generate([media.prompt(IMAGE, args.text_words) for _ in range(part)], args.v1_output_len,
                                   images=[media.image(args.image_size) for _ in range(part)])
            finished += part
    return seconds


def hf_throughput(hf: Any, args: argparse.Namespace, media: Any, num: int, batch: int, row_id: str) -> Figure:
    """transformers' requests per second over `num` prompts of one image each, in batches, --hf-runs times."""
    say(f"transformers {row_id}: {num} prompts with an image / {args.v1_output_len} out, batches of {batch}, "
        f"{args.hf_runs} runs")
    runs = []
    for i in range(args.hf_runs):
        seconds = hf_batched(hf, args, media, num, batch)
        runs.append(num / seconds)
        say(f"  run {i + 1}: {seconds:.2f} s, {runs[-1]:.2f} req/s")
    return Figure(runs)


def run_hf(args: argparse.Namespace, server_args: ServerArgs, only: set[str]) -> dict[str, Figure]:
    hf = HFRunner(server_args)
    media = MediaSource(args.seed + 1)
    say("transformers: warm-up")
    hf.generate([media.prompt(IMAGE, args.text_words)], 2, images=[media.image(args.image_size)])
    batch = min(args.hf_batch_size, args.v1_prompts)
    if "V1" in only:
        hf.generate([media.prompt(IMAGE, args.text_words) for _ in range(batch)], 2,
                    images=[media.image(args.image_size) for _ in range(batch)])
    if "V5" in only:
        hf.generate([media.prompt(VIDEO, args.text_words)], 1, videos=[media.video(args.video_frames,
                                                                                   args.video_size)])
    figures: dict[str, Figure] = {}
    if "V1" in only:
        # the reference's rate over its first --hf-v1-prompts prompts (whole batches of the same shape run at the
        # same rate; a slow reference, e.g. a mixture of experts looping over experts, need not run them all)
        row_id = _throughput_id(hf.model.config)
        num = min(args.v1_prompts, args.hf_v1_prompts or args.v1_prompts)
        figures[row_id] = hf_throughput(hf, args, media, num, batch, row_id)
    if "V2" in only:
        step = _image_step(hf.processor)
        smallest, largest, seen = _v2_range(args, step)
        sizes = size_ladder(smallest, largest, args.v2_sizes, step, seen)
        say(f"transformers V2: time to first token, a new image of each of {len(sizes)} sizes, {args.hf_runs} runs")
        runs = []
        for i in range(args.hf_runs):
            ms = [1000 * hf.generate([media.prompt(IMAGE, args.text_words)], 1, images=[media.image(size)])
                  for size in sizes]
            runs.append(statistics.median(ms))
            say(f"  run {i + 1}: median {runs[-1]:.1f} ms, p99 {p99(ms):.1f} ms")
        figures["V2"] = Figure(runs)
    if "V3" in only:
        say(f"transformers V3: batch 1 after an image, 1 and {args.v3_output_len} out, {args.hf_runs} runs")
        speeds = []
        for i in range(args.hf_runs):
            prompt, image = media.prompt(IMAGE, args.text_words), media.image(args.image_size)
            one = hf.generate([prompt], 1, images=[image])
            full = hf.generate([prompt], args.v3_output_len, images=[image])
            speeds.append((args.v3_output_len - 1) / (full - one))
            say(f"  run {i + 1}: {speeds[-1]:.1f} decode tok/s ({one * 1000:.1f} ms for 1 token, {full:.2f} s for "
                f"{args.v3_output_len})")
        figures["V3"] = Figure(speeds)
    if "V5" in only:
        say(f"transformers V5: time to first token, one {args.video_frames}-frame video, {args.hf_runs} runs")
        runs = []
        for i in range(args.hf_runs):
            runs.append(1000 * hf.generate([media.prompt(VIDEO, args.text_words)], 1,
                                           videos=[media.video(args.video_frames, args.video_size)]))
            say(f"  run {i + 1}: {runs[-1]:.1f} ms")
        figures["V5"] = Figure(runs)
    hf.close()
    return figures


# ----- main -----

# (the rows a note is about, none for every table; the note)
NOTES: list[tuple[set[str], str]] = [
    (set(), "floor: one large device-to-device copy timed with CUDA events (host copy on the CPU), read + write "
            "bytes, over the bytes of the engine's parameters (the vision tower's included)"),
    (set(), "every time includes the processor; images and videos are new random pixels, so no cache helps"),
    ({"V1", "V4"}, "V1, V4: requests / wall seconds of one generate call with every prompt; transformers: batches "
                   "of --hf-batch-size (left-padded), one after another"),
    ({"V2"}, "V2: ms to the one output token of a single request, median over image sizes not run before (p99: "
             "linear interpolation over those sizes); transformers: the same sizes"),
    ({"V3"}, "V3: one streamed request; decode tok/s = tokens after the first / (last token's arrival - first's); "
             "transformers: (N - 1) / (time of generate for N tokens - for 1 token)"),
    ({"V5"}, "V5: ms to the one output token; frames as given, taken as sampled at 2 fps"),
    (set(), "vs transformers: times faster (our rate over theirs; for times, theirs over ours)"),
    (set(), "targets are issue 16's on an H100: V1-V3 for qwen2.5-vl-7b, V4 for qwen3-vl-30b-a3b; V5 has none"),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_table_args(parser, f"Rows to run, comma-separated, from {', '.join(ROW_IDS)} (default: all; floor always "
                   "runs; V1 and V4 are the same workload, named V4 on a mixture of experts).", 16, "V1")
    parser.add_argument("--hf-v1-prompts", type=int, default=None,
                        help="Time transformers on only the first N of V1's prompts (its rate; default: all).")
    counts = [("v1-prompts", 128), ("v1-output-len", 64), ("text-words", 30), ("v2-sizes", 20),
              ("v3-output-len", 128), ("video-frames", 32)]
    for name, default in counts:
        parser.add_argument(f"--{name}", type=int, default=default, help=f"(default: {default})")
    sizes = [("image-size", "448x448", "V1's and V3's images"),
             ("v2-smallest", "224x224", "V2's smallest image"), ("v2-largest", "896x672", "V2's largest image"),
             ("video-size", "640x360", "V5's frames")]
    for name, default, what in sizes:
        parser.add_argument(f"--{name}", type=_size, default=_size(default), metavar="WxH",
                            help=f"{what}, width x height (default: {default})")
    args = parse_table_args(parser, argv, counts)
    if args.v3_output_len < 2:
        parser.error("--v3-output-len must be at least 2 (decode speed needs tokens after the first)")
    if args.video_frames % 2:
        parser.error("--video-frames must be even (Qwen-VL encodes frames in pairs)")
    only = parse_only(args.only, parser, ROW_IDS, aliases={})
    if "V4" in only:  # one workload, named by the model once it is loaded
        only = (only - {"V4"}) | {"V1"}
    server_args, bandwidth = start_table(args, parser)
    rows, env = run_mmserve(args, server_args, only, bandwidth)
    hf_rows = only - {"floor"}
    if not args.no_hf and hf_rows:
        for row_id, figure in run_hf(args, server_args, only).items():
            rows[row_id].hf = figure

    ordered = [rows[r] for r in ROW_IDS if r in rows]
    cells, records = build_table(ordered, args.no_hf, TARGETS, hf_row_ids=ROW_IDS[1:])
    notes = [text for ids, text in NOTES if not ids or ids & set(rows)]
    report(args, server_args, env, cells, records, notes)


if __name__ == "__main__":
    main()
