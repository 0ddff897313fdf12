"""The processor-output cache and per-request media settings (mm_processor_kwargs): a repeated image skips decoding and
the processor, other settings miss it and give other token counts, the same ones transformers' processor gives with
those kwargs; the settings are checked against the model family's list; the items of a request run in parallel in
the worker pool, as far as the memory limits let them."""

from __future__ import annotations

import io
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from mmserve.multimodal.media import MediaError
from mmserve.multimodal.processor import MediaSettingsError, MultimodalProcessor
from mmserve.multimodal.processor_cache import ProcessedMedia, ProcessorCache

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


def processor(model_dir, **flags) -> MultimodalProcessor:
    from transformers import AutoConfig

    from mmserve.config import ServerArgs
    from mmserve.multimodal.processors import ProcessorRegistry

    config = AutoConfig.from_pretrained(model_dir)
    args = ServerArgs(model_path=str(model_dir), **flags)
    return MultimodalProcessor(args, ProcessorRegistry.resolve(config.architectures), config, model_dir)


def png(width: int, height: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(seed).randint(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


class Counting:
    """The HF processor, counting its calls."""

    def __init__(self, hf):
        self.hf, self.calls = hf, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.hf(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.hf, name)


def reference(mm_processor: MultimodalProcessor, text: str, images: list[bytes], **kwargs):
    """transformers' processor on the same decoded images, with `kwargs` as given; pixel bounds as a whole `size`
    (transformers 5.17 drops a flat min_pixels or max_pixels given alone at call time)."""
    decoded = [Image.open(io.BytesIO(data)).convert("RGB") for data in images]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return mm_processor.hf(text=[text], images=decoded, return_tensors="pt",
                               **bounds_as_size(mm_processor.hf.image_processor, kwargs))


def bounds_as_size(hf_processor, kwargs: dict) -> dict:
    """kwargs with min_pixels / max_pixels turned into the processor's `size`, the other bound its default."""
    if "min_pixels" not in kwargs and "max_pixels" not in kwargs:
        return kwargs
    kwargs, size = dict(kwargs), dict(hf_processor.size)
    size["shortest_edge"] = kwargs.pop("min_pixels", size["shortest_edge"])
    size["longest_edge"] = kwargs.pop("max_pixels", size["longest_edge"])
    return {**kwargs, "size": size}


@pytest.fixture(scope="module")
def qwen2(tiny_qwen2_vl_dir):
    return processor(tiny_qwen2_vl_dir)


# ----------------------------------------------------------------------------------------------- the cache


def entry(rows: int, fill: float = 1.0) -> ProcessedMedia:
    return ProcessedMedia({"pixel_values": torch.full((rows, 4), fill)}, (7,) * rows)


def test_cache_hands_out_private_copies():
    cache = ProcessorCache(1 << 20)
    original = entry(2)
    cache.put(b"k", original)
    original.features["pixel_values"].fill_(5)  # the caller's own tensor: the cache kept a copy
    first = cache.get(b"k")
    first.features["pixel_values"].fill_(9)  # a reader scribbling on what it got
    assert torch.equal(cache.get(b"k").features["pixel_values"], torch.ones(2, 4))
    assert cache.get(b"other") is None and (cache.hits, cache.misses) == (2, 1)


def test_cache_is_bounded_in_bytes_and_least_recently_used_goes_first():
    size = entry(2).nbytes  # 2 x 4 float32 + 2 ids
    cache = ProcessorCache(3 * size)
    for key in (b"a", b"b", b"c"):
        cache.put(key, entry(2))
    cache.get(b"a")  # a is now the most recent
    cache.put(b"d", entry(2))
    assert cache.get(b"b") is None and cache.get(b"a") is not None and len(cache) == 3 and cache.used == 3 * size
    cache.put(b"huge", entry(100))  # larger than the whole cache: not kept, nothing evicted for it
    assert cache.get(b"huge") is None and len(cache) == 3
    off = ProcessorCache(0)
    off.put(b"a", entry(1))
    assert off.get(b"a") is None and off.used == 0


def test_cache_is_thread_safe():
    cache = ProcessorCache(10 * entry(3).nbytes)
    errors = []

    def work(seed: int) -> None:
        rng = np.random.RandomState(seed)
        try:
            for _ in range(300):
                key = bytes([rng.randint(30)])
                if rng.rand() < 0.5:
                    cache.put(key, entry(3, float(key[0])))
                else:
                    got = cache.get(key)
                    assert got is None or torch.all(got.features["pixel_values"] == key[0])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert cache.used == sum(e.nbytes for e in cache._entries.values()) <= cache.capacity


# ----------------------------------------------------------------------------------------------- through the processor


def test_the_torchvision_processor_is_used(qwen2):
    from transformers.image_processing_backends import TorchvisionBackend

    assert isinstance(qwen2.hf.image_processor, TorchvisionBackend)


def test_repeated_image_skips_the_processor(tiny_qwen2_vl_dir):
    mm_processor = processor(tiny_qwen2_vl_dir)
    hf = mm_processor.hf = Counting(mm_processor.hf)
    data = png(150, 100, 0)
    ids, mm = mm_processor.process(f"Look {IMAGE}", [("image", data)])
    again_ids, again = mm_processor.process(f"Again {IMAGE}", [("image", data)])
    assert hf.calls == 1 and mm_processor.cache.hits == 1
    assert again_ids[-len(ids) + 2:] == ids[2:]  # the expansion, after the first word
    assert again.items[0].hash == mm.items[0].hash
    assert torch.equal(again.items[0].features["pixel_values"], mm.items[0].features["pixel_values"])
    # Other settings: another processor output, with fewer tokens and another hash (another encoder output)
    small = mm_processor.settings_for({"max_pixels": 28 * 28 * 4})
    small_ids, small_mm = mm_processor.process(f"Look {IMAGE}", [("image", data)], small)
    assert hf.calls == 2 and len(small_ids) < len(ids) and small_mm.items[0].hash != mm.items[0].hash
    mm_processor.process(f"Look {IMAGE}", [("image", data)], mm_processor.settings_for({"max_pixels": 28 * 28 * 4}))
    assert hf.calls == 2
    # The same image twice in one request: processed once, one hash (the engine encodes it once)
    _, twice = mm_processor.process(IMAGE * 2, [("image", png(60, 60, 1))] * 2)
    assert hf.calls == 3 and twice.items[0].hash == twice.items[1].hash


def test_cache_off(tiny_qwen2_vl_dir):
    mm_processor = processor(tiny_qwen2_vl_dir, mm_processor_cache_mb=0)
    hf = mm_processor.hf = Counting(mm_processor.hf)
    for _ in range(2):
        mm_processor.process(IMAGE, [("image", png(60, 60, 2))])
    assert hf.calls == 2 and len(mm_processor.cache) == 0


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_pixels_per_request_count_tokens_as_transformers_does(family, request):
    mm_processor = processor(request.getfixturevalue(f"tiny_{family}_dir"))
    text = f"A {IMAGE} and {IMAGE}."
    images = [png(300, 200, 3), png(90, 160, 4)]
    default_ids, _ = mm_processor.process(text, [("image", data) for data in images])
    assert default_ids == reference(mm_processor, text, images)["input_ids"][0].tolist()
    for kwargs in ({"max_pixels": 128 * 128}, {"min_pixels": 200 * 200}, {"min_pixels": 8192, "max_pixels": 20000},
                   {"max_pixels": 4096}):
        ids, mm = mm_processor.process(text, [("image", data) for data in images], mm_processor.settings_for(kwargs))
        ref = reference(mm_processor, text, images, **kwargs)
        assert ids == ref["input_ids"][0].tolist() and len(ids) != len(default_ids), kwargs
        if kwargs.get("max_pixels") != 4096:
            assert torch.equal(torch.cat([it.features["pixel_values"] for it in mm.items]), ref["pixel_values"])
        # else: 300x200 is 4x the request's max_pixels or more, so it was shrunk while decoding (box average, see
        # PendingImage): the same grid, not the same pixels


def test_video_settings(tiny_qwen2_vl_dir, tmp_path):
    from vl_helpers import video_data_url

    mm_processor = processor(tiny_qwen2_vl_dir)
    url = video_data_url(tmp_path / "clip.mp4", frames=30, fps=10)  # 3 s: 6 frames at 2 fps, three frame pairs

    def frame_pairs(kwargs):
        _, mm = mm_processor.process(f"Clip {VIDEO}", [("video", url)], mm_processor.settings_for(kwargs))
        return mm.items[0].features["grid_thw"][0, 0].item()

    assert [frame_pairs(kw) for kw in (None, {"fps": 1}, {"num_frames": 2}, {"max_frames": 4})] == [3, 2, 1, 2]
    # Pixel bounds reach the video processor as well, as transformers routes them (frames given as they are)
    frames = np.random.RandomState(0).randint(0, 255, (4, 120, 160, 3), dtype=np.uint8)
    ids, mm = mm_processor.process(f"Clip {VIDEO}", [("video", frames)],
                                   mm_processor.settings_for({"max_pixels": 5000}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ref = mm_processor.hf(text=[f"Clip {VIDEO}"], videos=[frames], return_tensors="pt", do_sample_frames=False,
                              video_metadata=[{"fps": 2.0, "total_num_frames": 4, "frames_indices": [0, 1, 2, 3]}],
                              **bounds_as_size(mm_processor.hf.video_processor, {"max_pixels": 5000}))
    assert ids == ref["input_ids"][0].tolist()
    assert torch.equal(mm.items[0].features["pixel_values"], ref["pixel_values_videos"])


def test_settings_are_checked(qwen2, tiny_qwen2_vl_dir):
    def refused(kwargs, key, match):
        with pytest.raises(MediaSettingsError, match=match) as info:
            qwen2.settings_for(kwargs)
        assert info.value.key == key

    refused({"max_pixels": 1000, "do_resize": False}, "do_resize", r"unknown key 'do_resize' for this model "
            r"\(qwen2_vl takes: min_pixels, max_pixels, fps, num_frames, min_frames, max_frames\)")
    refused({"size": {"longest_edge": 10}}, "size", "unknown key 'size'")
    refused({"max_pixels": "1000"}, "max_pixels", r'max_pixels must be an integer, got "1000"')
    refused({"max_pixels": 1000.0}, "max_pixels", "must be an integer, got 1000.0")
    refused({"num_frames": True}, "num_frames", "must be an integer, got true")
    refused({"fps": "2"}, "fps", 'fps must be a number, got "2"')
    refused({"fps": float("nan")}, "fps", r"fps must be in \(0, 60\]")
    refused({"fps": 0}, "fps", r"fps must be in \(0, 60\]")
    refused({"max_pixels": 28 * 28 * 80 + 1}, "max_pixels", r"must be in \[1, 62720\] \(the model processor's maximum; "
            "--mm-max-pixels raises it\\), got 62721")
    refused({"min_pixels": 0}, "min_pixels", r"must be in \[1, 62720\]")
    refused({"max_frames": 769}, "max_frames", r"must be in \[1, 768\]")
    refused({"fps": 1, "num_frames": 4}, "num_frames", "mutually exclusive")
    refused({"min_pixels": 5000, "max_pixels": 4000}, "min_pixels", r"min_pixels \(5000\) must not exceed max_pixels")
    with pytest.raises(MediaSettingsError, match="must be an object"):
        qwen2.settings_for(["max_pixels"])
    assert issubclass(MediaSettingsError, MediaError) and qwen2.settings_for({}) == qwen2.default_settings
    # The server's flag raises the limit; asking for the processor's own bounds is the default (one cache entry)
    assert processor(tiny_qwen2_vl_dir, mm_max_pixels=10 ** 6).settings_for({"max_pixels": 10 ** 6}).image_pixels \
        == (3136, 10 ** 6)
    assert qwen2.settings_for({"min_pixels": 3136, "max_pixels": 62720}) == qwen2.default_settings


def test_qwen3_vl_pixels_apply_to_images_only(tiny_qwen3_vl_dir):
    settings = processor(tiny_qwen3_vl_dir).settings_for({"max_pixels": 128 * 128, "num_frames": 4})
    assert settings.image_pixels == (64 * 64, 128 * 128) and settings.video_pixels is None
    assert settings.num_frames == 4


# ----------------------------------------------------------------------------------------------- parallel items


def spans(mm_processor: MultimodalProcessor, count: int) -> list[tuple[float, float]]:
    """Process `count` different images in one request, each taking at least 0.2 s in its worker; when each ran."""
    times: list[tuple[float, float]] = []
    prepare = mm_processor._prepare

    def slow(item, settings):
        start = time.monotonic()
        time.sleep(0.2)
        out = prepare(item, settings)
        times.append((start, time.monotonic()))
        return out

    mm_processor._prepare = slow
    mm_processor.process(IMAGE * count, [("image", png(300, 300, 10 + i)) for i in range(count)])
    return sorted(times)


def overlap(times: list[tuple[float, float]]) -> bool:
    return any(later[0] < earlier[1] for earlier, later in zip(times, times[1:], strict=False))


def test_items_of_a_request_run_in_parallel(tiny_qwen2_vl_dir):
    assert overlap(spans(processor(tiny_qwen2_vl_dir, mm_processor_workers=2), 2))
    assert not overlap(spans(processor(tiny_qwen2_vl_dir, mm_processor_workers=1), 2))
    # Two 300x300 images (0.26 MB kept, as much while decoding) in 1 MiB: the request may hold both, but not two
    # decoding at once, so they run one after the other.
    assert not overlap(spans(processor(tiny_qwen2_vl_dir, mm_processor_workers=2, max_mm_bytes_per_request=1), 2))


def test_a_failed_item_fails_the_request_and_frees_its_memory(tiny_qwen2_vl_dir):
    mm_processor = processor(tiny_qwen2_vl_dir, mm_processor_workers=2)
    truncated = png(300, 300, 20)[:2000]  # a valid header, its pixels cut off
    with pytest.raises(MediaError, match="image 1: could not decode image"):
        mm_processor.process(IMAGE * 3, [("image", png(300, 300, 21)), ("image", truncated),
                                         ("image", png(300, 300, 22))])
    assert mm_processor.memory.held == 0
