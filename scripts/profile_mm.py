"""Where one image request's time to first token goes (issue 16's V2): the processor, the vision tower, and the
prefill step around it, on `EngineCore` directly, then a torch.profiler trace of one such prefill step.

    python scripts/profile_mm.py --preset qwen2.5-vl-7b --tokenizer-dir .gpu/tokenizer [--size 448x448]

Prints medians over --runs fresh random images (no cache helps): processor ms (`MultimodalProcessor.process`),
prefill step ms (the step that encodes the image and samples the first token), tower ms (`model.encode` alone,
synchronised), and the trace's top operators by GPU and by CPU time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from PIL import Image

from mmserve.bench.presets import add_preset_args, apply_preset
from mmserve.config import ServerArgs
from mmserve.engine_core import EngineCore
from mmserve.messages import GenerateRequest
from mmserve.models.loader import split_gguf
from mmserve.multimodal.inputs import from_wire, to_wire
from mmserve.multimodal.processor import MultimodalProcessor

PROMPT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe this picture in a few words." \
         "<|im_end|>\n<|im_start|>assistant\n"
VIDEO_PROMPT = PROMPT.replace("<|image_pad|>", "<|video_pad|>")
ONE_TOKEN = {"temperature": 0, "max_new_tokens": 1, "ignore_eos": True}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_preset_args(parser)
    parser.add_argument("--model-path")
    parser.add_argument("--device")
    parser.add_argument("--size", default="448x448")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--video", type=int, default=0,
                        help="Instead of an image: a video of this many frames of --size (V5: 32 at 640x360).")
    parser.add_argument("--batch", type=int, default=0,
                        help="Instead: profile V1's shape, this many requests with one new image each through the "
                        "in-process Engine (its processor pool included), and print where the wall time goes.")
    parser.add_argument("--trace", help="With --batch: write the chrome trace here.")
    parser.add_argument("--mm-image-prep", default=ServerArgs.mm_image_prep, choices=["auto", "api", "engine"],
                        help="Where images are resized and patched (see mmserve serve --help).")
    parser.add_argument("--vision-cuda-graph-max-patches", type=int, default=ServerArgs.vision_cuda_graph_max_patches,
                        help="Capture the vision tower's CUDA graphs up to this many patches (0: eager).")
    args = parser.parse_args()
    apply_preset(args, parser)
    kwargs = {"model_path": args.model_path, "max_total_tokens": 65536,
              "vision_cuda_graph_max_patches": args.vision_cuda_graph_max_patches, "mm_image_prep": args.mm_image_prep}
    if args.preset:
        kwargs["load_format"] = "dummy"
    if args.device:
        kwargs["device"] = args.device
    server_args = ServerArgs(**kwargs)
    if args.batch:
        return profile_batch(server_args, args)
    core = EngineCore(server_args)
    device = core.runner.device
    folder, _ = split_gguf(core.checkpoint)
    processor = MultimodalProcessor(server_args, core.processor_spec, core.model_config.hf_config, folder)
    width, height = map(int, args.size.split("x"))
    rng = np.random.default_rng(0)

    def image() -> Image.Image:
        return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))

    def request() -> tuple[str, list]:
        if args.video:
            return VIDEO_PROMPT, [("video", rng.integers(0, 255, (args.video, height, width, 3), dtype=np.uint8))]
        return PROMPT, [("image", image())]

    def one(rid: str) -> tuple[float, float, float, int]:
        start = time.perf_counter()
        ids, mm = processor.process(*request())
        wire = to_wire(mm)
        processed = time.perf_counter()
        core.handle(GenerateRequest(rid, ids, ONE_TOKEN, mm_inputs=wire))
        sync(device)
        step_start = time.perf_counter()
        while core.has_work():
            core.step()
        sync(device)
        done = time.perf_counter()
        items = from_wire(wire).items  # on the host, as the engine receives them
        sync(device)
        tower_start = time.perf_counter()
        model = core.runner.model
        model.encode(model.encoder_cache.prepare(items))  # with the engine's image processing (--mm-image-prep)
        sync(device)
        tower = time.perf_counter() - tower_start
        return ((processed - start) * 1e3, (done - step_start) * 1e3, tower * 1e3, len(ids))

    for i in range(3):
        one(f"warm{i}")
    runs = [one(f"r{i}") for i in range(args.runs)]
    proc, step, tower, tokens = (statistics.median(col) for col in zip(*runs, strict=True))
    what = f"{args.video}-frame {args.size} video" if args.video else f"{args.size} image"
    print(f"{what}, {tokens:.0f} prompt tokens, median of {args.runs}: processor {proc:.1f} ms, prefill "
          f"step (tower + language model + first token) {step:.1f} ms, tower alone (with the engine's image prep) "
          f"{tower:.1f} ms; processor + step {proc + step:.1f} ms")
    if device.type != "cuda":
        return
    from torch.profiler import ProfilerActivity, profile

    ids, mm = processor.process(*request())
    core.handle(GenerateRequest("traced", ids, ONE_TOKEN, mm_inputs=to_wire(mm)))
    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as trace:
        while core.has_work():
            core.step()
        sync(device)
    events = trace.key_averages()
    gpu_ms = sum(e.self_device_time_total for e in events) / 1e3
    launches = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    print(f"traced prefill step: GPU kernels {gpu_ms:.1f} ms, {launches} kernel launches")
    print(events.table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))


def profile_batch(server_args: ServerArgs, args: argparse.Namespace) -> None:
    """V1's shape through `Engine.generate`: wall time, the processor's share, the GPU's busy time and the steps."""
    from mmserve import Engine

    width, height = map(int, args.size.split("x"))
    rng = np.random.default_rng(0)
    sampling = {"temperature": 0, "max_new_tokens": 64, "ignore_eos": True}

    def images() -> list[Image.Image]:
        return [Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)) for _ in range(args.batch)]

    with Engine(**vars(server_args)) as engine:
        device, stats = engine.device, engine.scheduler.stats
        for _ in range(2):
            engine.generate([PROMPT] * args.batch, sampling, image_data=images())
        batch = images()
        start = time.perf_counter()
        for img in batch:
            engine.processor.process(PROMPT, [("image", img)])
        processing = time.perf_counter() - start
        from torch.profiler import ProfilerActivity, profile

        before = (stats.prefill_steps, stats.decode_steps)
        batch = images()
        sync(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as trace:
            start = time.perf_counter()
            engine.generate([PROMPT] * args.batch, sampling, image_data=batch)
            sync(device)
            wall = time.perf_counter() - start
        events = trace.key_averages()
        gpu_s = sum(e.self_device_time_total for e in events) / 1e6
        print(f"batch of {args.batch} ({args.size}, 64 out): wall {wall:.2f} s under the profiler "
              f"({args.batch / wall:.1f} req/s); GPU kernels {gpu_s:.2f} s ({100 * gpu_s / wall:.0f}% of wall); "
              f"{stats.prefill_steps - before[0]} prefill and {stats.decode_steps - before[1]} decode steps; "
              f"the processor alone on the caller's thread, serially: {processing:.2f} s")
        print(events.table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=70))
        print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=70))
        if args.trace:
            trace.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
