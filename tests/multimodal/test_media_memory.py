"""Decoded-media memory: images far larger than the model's processor resizes to are shrunk while decoding (JPEG by
libjpeg's scaled decoding, others by an integer box average), ordinary images stay bit-identical; every request's
decoded bytes are counted from the headers before decoding, against a per-request limit and a budget shared by all
requests (a byte semaphore: wait for room, then a 503)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time

import av
import numpy as np
import pytest
from PIL import Image
from vl_helpers import solid_png

from mmserve.multimodal.media import (
    MediaBusy,
    MediaError,
    MediaMemory,
    MediaPolicy,
    load_image,
    open_image,
    shrink_factor,
)

TARGET = 28 * 28 * 80  # the tiny Qwen2-VL processor's max_pixels
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("huge") / "solid.png"
    path.write_bytes(solid_png(8192, 8192))
    return path


@pytest.fixture(scope="module")
def other_huge_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("huge") / "other.png"
    path.write_bytes(solid_png(8192, 8192, (20, 90, 160)))
    return path


def processor(model_dir, **flags):
    from transformers import AutoConfig

    from mmserve.config import ServerArgs
    from mmserve.multimodal.processor import MultimodalProcessor
    from mmserve.multimodal.processors import ProcessorRegistry

    config = AutoConfig.from_pretrained(model_dir)
    args = ServerArgs(model_path=str(model_dir), **flags)
    return MultimodalProcessor(args, ProcessorRegistry.resolve(config.architectures), config, model_dir)


# ----------------------------------------------------------------------------------------------- shrinking


def test_shrink_factor():
    assert shrink_factor(4 * TARGET - 1, TARGET) == 1  # under 4x: kept whole
    assert shrink_factor(4 * TARGET, TARGET) == 2
    assert shrink_factor(8192 * 8192, TARGET) == 32  # 256x256 = 65536 >= 62720
    assert shrink_factor(8192 * 8192, None) == 1


def test_ordinary_images_are_untouched():
    """Under 4x the processor's maximum an image takes exactly the old path, so outputs match transformers."""
    for fmt in ("PNG", "JPEG"):
        data = encoded(noise(500, 400), fmt)  # 200000 pixels: 3.2x the target
        assert np.array_equal(np.asarray(load_image(data, MediaPolicy(), target_pixels=TARGET)),
                              np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def test_large_png_is_box_averaged_to_at_least_the_target():
    source = noise(1200, 900)  # 1.08M pixels, 17x the target: factor 4 -> 300x225
    with open_image(encoded(source, "PNG"), MediaPolicy(), target_pixels=TARGET) as pending:
        assert (pending.factor, pending.decode_bytes, pending.kept_bytes) == (4, 1200 * 900 * 3, 300 * 225 * 3)
        image = pending.load()
    assert image.size == (300, 225) and 300 * 225 >= TARGET and image.mode == "RGB"
    assert np.array_equal(np.asarray(image), np.asarray(source.reduce(4)))


def test_large_jpeg_decodes_scaled_down():
    source = Image.fromarray(np.broadcast_to(np.arange(4000, dtype=np.uint8)[None, :, None] // 16,
                                             (3000, 4000, 3)).copy())
    with open_image(encoded(source, "JPEG", quality=90), MediaPolicy(), target_pixels=TARGET) as pending:
        # libjpeg decodes at 1/8 scale (500x375, 3x the target): the 12M-pixel image never exists in memory.
        assert pending.decode_bytes == 500 * 375 * 3 and pending.factor == 1
        image = pending.load()
    assert image.size == (500, 375)
    assert np.abs(np.asarray(image, np.int16) - np.asarray(source.resize((500, 375), Image.BOX), np.int16)).mean() < 2


def test_modes_are_shrunk_like_plain_convert():
    rgba = Image.new("RGBA", (1000, 1000), (10, 20, 30, 0))
    bilevel = Image.new("1", (1000, 1000), 1)
    palette = Image.new("P", (1000, 1000), 3)
    palette.putpalette([0, 0, 0, 9, 9, 9, 50, 60, 70, 200, 100, 0] * 64)
    for image, colour in ((rgba, (10, 20, 30)), (bilevel, (255, 255, 255)), (palette, (200, 100, 0))):
        out = load_image(encoded(image, "PNG"), MediaPolicy(), target_pixels=TARGET)
        assert out.mode == "RGB" and out.size == (334, 334) and out.getpixel((5, 5)) == colour


def test_huge_png_through_the_processor_matches_transformers_grid(tiny_qwen2_vl_dir, huge_png):
    """The 8192x8192 solid PNG: shrunk 32x while decoding, it still gives the processor's 224x224 grid, and (one
    colour) the very same pixel values as transformers on the full image."""
    mm_processor = processor(tiny_qwen2_vl_dir)
    ids, mm = mm_processor.process(f"Look {IMAGE}", [("image", huge_png.read_bytes())])
    full = mm_processor.hf(text=[f"Look {IMAGE}"], images=[Image.new("RGB", (8192, 8192), (200, 30, 60))],
                           return_tensors="pt")
    assert ids == full["input_ids"][0].tolist()
    item = mm.items[0]
    assert item.features["grid_thw"].tolist() == full["image_grid_thw"].tolist() == [[1, 16, 16]]
    assert np.allclose(item.features["pixel_values"].numpy(), full["pixel_values"].numpy(), atol=1e-6)


_PEAK_SCRIPT = """
import json, resource, sys
from pathlib import Path
from transformers import AutoConfig
from mmserve.config import ServerArgs
from mmserve.multimodal.processors import ProcessorRegistry
from mmserve.multimodal.processor import MultimodalProcessor

model_dir, pngs = Path(sys.argv[1]), [Path(sys.argv[2]).read_bytes(), Path(sys.argv[4]).read_bytes()]
config = AutoConfig.from_pretrained(model_dir)
proc = MultimodalProcessor(ServerArgs(model_path=str(model_dir), mm_processor_workers=1),
                           ProcessorRegistry.resolve(config.architectures), config, model_dir)
image = "<|vision_start|><|image_pad|><|vision_end|>"
proc.process(image, [("image", Path(sys.argv[3]).read_bytes())])  # warm up: lazy imports, first allocations
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
before = peak()
proc.process(image * 8, [("image", pngs[i % 2]) for i in range(8)])
print(json.dumps({"peak_growth": peak() - before}))
"""


def test_eight_huge_pngs_in_one_request_stay_bounded(tiny_qwen2_vl_dir, huge_png, other_huge_png, tmp_path):
    """Eight 8192x8192 PNGs in one request (two different ones, each decoded once): with one worker, decoded one at a
    time and shrunk at once, the API process grows by about one full-size decode (PIL holds 8192x8192 RGB in
    256 MiB), not by 8 x 1 GiB as before. Measured in a fresh process, whose peak RSS belongs to this alone."""
    small = tmp_path / "small.png"
    small.write_bytes(encoded(noise(64, 48), "PNG"))
    result = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(tiny_qwen2_vl_dir), str(huge_png), str(small),
                             str(other_huge_png)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    growth = json.loads(result.stdout.strip().splitlines()[-1])["peak_growth"]
    assert growth < 400 * 2 ** 20, f"peak RSS grew by {growth / 2 ** 20:.0f} MiB"


# ----------------------------------------------------------------------------------------------- budgets


def test_per_request_limit(tiny_qwen2_vl_dir, huge_png):
    mm_processor = processor(tiny_qwen2_vl_dir, max_mm_bytes_per_request=100)
    with pytest.raises(MediaError) as info:
        mm_processor.process(f"Look {IMAGE}", [("image", huge_png.read_bytes())])
    assert str(info.value) == ("image 0: decoding it would bring the request's media to 192 MiB of RGB, over the "
                               "limit of 100 MiB per request (--max-mm-bytes-per-request)")
    assert mm_processor.memory.held == 0
    # Kept images add up: four 300x300 images (under 4x the target, kept whole: 0.26 MiB each) in 1 MiB.
    mm_processor = processor(tiny_qwen2_vl_dir, max_mm_bytes_per_request=1)
    image = encoded(noise(300, 300), "PNG")
    mm_processor.process(IMAGE * 2, [("image", image)] * 2)
    with pytest.raises(MediaError, match=r"^image 2: decoding it would bring the request's media to 1\.0 MiB"):
        mm_processor.process(IMAGE * 4, [("image", image)] * 4)


def test_request_larger_than_the_shared_budget_is_refused_at_once(tiny_qwen2_vl_dir):
    mm_processor = processor(tiny_qwen2_vl_dir, max_mm_bytes_in_flight=1)
    start = time.monotonic()
    with pytest.raises(MediaError, match=r"more than the 1 MiB the server holds for all requests together "
                                         r"\(--max-mm-bytes-in-flight\)"):
        mm_processor.process(IMAGE, [("image", encoded(noise(1000, 400), "PNG"))])  # 1.1 MiB while decoding
    assert time.monotonic() - start < 1


def test_video_is_sampled_more_sparsely_to_fit_the_request(tiny_qwen2_vl_dir, tmp_path):
    path = tmp_path / "big.mp4"
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=10, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        for i in range(30):
            frame = av.VideoFrame.from_ndarray(np.full((240, 320, 3), 8 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    data = path.read_bytes()
    _, mm = processor(tiny_qwen2_vl_dir).process(VIDEO, [("video", data)])
    assert mm.items[0].features["grid_thw"][0, 0] == 3  # 3 s at 2 fps: six frames, three frame pairs
    # 1 MiB holds one decoding frame (225 KiB) and three more: two frames (one pair) over the same 3 s.
    _, mm = processor(tiny_qwen2_vl_dir, max_mm_bytes_per_request=1).process(VIDEO, [("video", data)])
    assert mm.items[0].features["grid_thw"][0, 0] == 1
    with pytest.raises(MediaError, match=r"^video 0: decoding it would bring the request's media to"):
        processor(tiny_qwen2_vl_dir, max_mm_bytes_per_request=1).process(
            IMAGE + VIDEO, [("image", encoded(noise(400, 400), "PNG")), ("video", data)])


# ----------------------------------------------------------------------------------------------- shared budget


def test_memory_waits_for_room_in_arrival_order():
    memory = MediaMemory(capacity=100, wait_s=5)
    order: list[str] = []
    first = memory.hold(80)
    first.__enter__()

    def request(name: str, nbytes: int) -> None:
        with memory.hold(nbytes):
            order.append(name)
            time.sleep(0.05)

    big = threading.Thread(target=request, args=("big", 90))
    small = threading.Thread(target=request, args=("small", 10))
    big.start()
    time.sleep(0.1)
    small.start()  # would fit now (80 + 10), but waits behind the earlier, larger request
    time.sleep(0.1)
    assert order == [] and memory.held == 80
    first.__exit__(None, None, None)
    big.join(5)
    small.join(5)
    assert order == ["big", "small"] and memory.held == 0


def test_memory_wait_is_bounded():
    memory = MediaMemory(capacity=100, wait_s=0.2)
    with memory.hold(60):
        start = time.monotonic()
        with pytest.raises(MediaBusy, match="busy decoding other requests' media"):
            with memory.hold(50):
                pass
        assert 0.15 < time.monotonic() - start < 1
    with memory.hold(100):
        assert memory.held == 100


def test_busy_is_a_503_at_the_api(tiny_qwen2_vl_dir):
    import asyncio

    from mmserve.config import ServerArgs
    from mmserve.server.errors import APIError
    from mmserve.tokenizer.manager import TokenizerManager

    manager = TokenizerManager(ServerArgs(model_path=str(tiny_qwen2_vl_dir), max_mm_bytes_in_flight=1))
    memory = manager.mm_processor.memory
    memory.wait_s = 0.2
    try:
        with memory.hold(memory.capacity):  # another request holds all the room
            with pytest.raises(APIError) as info:
                asyncio.run(manager.process_media(IMAGE, [("image", encoded(noise(64, 48), "PNG"))]))
        assert info.value.status == 503 and "retry later" in info.value.message
        ids, _ = asyncio.run(manager.process_media(IMAGE, [("image", encoded(noise(64, 48), "PNG"))]))
        assert ids
    finally:
        asyncio.run(manager.shutdown())
