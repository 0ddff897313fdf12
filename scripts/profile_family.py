"""Where one image request's time to first token goes for any vision-language family (issue 17's F2): the processor
alone, the whole request, and a torch.profiler trace of one request through the in-process Engine.

    python scripts/profile_family.py --preset gemma-3-12b --tokenizer-dir .gpu/tokenizer [--size 448x448]

Prints medians over --runs new random images: processor ms (`MultimodalProcessor.process`, in this thread), time to
first token ms (`Engine.generate` of one token), then the traced request's top operators by GPU and by CPU time.
"""

from __future__ import annotations

import argparse
import statistics
import time

from mmserve import Engine
from mmserve.bench.families import chat_layout
from mmserve.bench.fastpath import sync, ttft
from mmserve.bench.multimodal import IMAGE, MediaSource
from mmserve.bench.presets import add_preset_args, apply_preset
from mmserve.config import ServerArgs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_preset_args(parser)
    parser.add_argument("--model-path")
    parser.add_argument("--size", default="448x448")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--text-words", type=int, default=30)
    parser.add_argument("--trace", help="Also write the traced request's chrome trace here.")
    args = parser.parse_args()
    apply_preset(args, parser)
    server_args = ServerArgs(model_path=args.model_path, load_format="dummy" if args.preset else "auto")
    size = tuple(map(int, args.size.split("x")))
    media = MediaSource(0, chat_layout(args.model_path))
    with Engine(**vars(server_args)) as engine:
        for _ in range(3):
            ttft(engine, prompt=media.prompt(IMAGE, args.text_words), image_data=media.image(size))
        proc = []
        for _ in range(args.runs):
            start = time.perf_counter()
            engine.processor.process(media.prompt(IMAGE, args.text_words), [("image", media.image(size))])
            proc.append(1000 * (time.perf_counter() - start))
        first = [1000 * ttft(engine, prompt=media.prompt(IMAGE, args.text_words), image_data=media.image(size))
                 for _ in range(args.runs)]
        print(f"{args.size} image: processor {statistics.median(proc):.1f} ms, time to first token "
              f"{statistics.median(first):.1f} ms (medians of {args.runs})")
        if engine.device.type != "cuda":
            return
        from torch.profiler import ProfilerActivity, profile

        prompt, image = media.prompt(IMAGE, args.text_words), media.image(size)
        sync(engine.device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as trace:
            ttft(engine, prompt=prompt, image_data=image)
            sync(engine.device)
        if args.trace:
            trace.export_chrome_trace(args.trace)
        events = trace.key_averages()
        print(f"traced request: GPU kernels {sum(e.self_device_time_total for e in events) / 1e3:.1f} ms")
        print(events.table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=70))
        print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=70))


if __name__ == "__main__":
    main()
