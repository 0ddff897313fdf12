"""MultimodalProcessor: prompt text with media placeholders + media sources -> expanded token ids and the
request's MultimodalInputs, through the model's Hugging Face processor. Used by the in-process Engine and by
the API server (downloads in the processor's own pool, the rest in the server's worker pool, off the event loop).

A request's media go through three steps: `download` (http(s) sources, concurrently, in a pool of their own so
slow servers never hold the CPU workers), then in `process` the headers are read and the decoded bytes budgeted
(per request, and across requests through `MediaMemory`) before any pixel is decoded, then decoding (images
shrunk while decoding where the model's processor would shrink them anyway, videos sampled by seeking) and the
Hugging Face processor."""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmserve.config import ServerArgs
from mmserve.multimodal.inputs import MultimodalInputs
from mmserve.multimodal.media import (
    MediaError,
    MediaMemory,
    MediaPolicy,
    PendingImage,
    VideoClip,
    VideoReader,
    fetch_bytes,
    mib,
    open_image,
    open_video,
)

_MIB = 1024 * 1024
_DEFAULT_LIMITS = {"image": 16, "video": 2}
# Qwen's video sampling: 2 frames a second, at least 4 and at most 768 frames, an even count (frame pairs)
_DEFAULT_VIDEO = {"fps": 2.0, "min_frames": 4, "max_frames": 768}
# Hugging Face processors that resize to a pixel budget (Qwen-VL's smart_resize): `size["longest_edge"]` is the
# most pixels an image, or a video frame, comes out with.
_PIXEL_BUDGET_PROCESSORS = frozenset({"Qwen2VLImageProcessor", "Qwen2VLImageProcessorPil", "Qwen2VLVideoProcessor",
                                      "Qwen3VLVideoProcessor"})


def sample_frame_indices(total: int, fps: float, target_fps: float, min_frames: int, max_frames: int,
                         multiple: int = 2) -> np.ndarray:
    """Indices of evenly spaced frames at about `target_fps` out of `total` frames shot at `fps`, between min and max
    frames and a multiple of `multiple` (Qwen's frame pairs)."""
    duration = total / fps if fps > 0 else total / target_fps
    want = round(duration * target_fps)
    want = max(min_frames, min(max_frames, want, total))
    want = max(multiple, want - want % multiple)
    return np.linspace(0, total - 1, want).round().astype(int)


def media_parts(messages: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    """(modality, source) of every media content part of chat messages, in order."""
    found = []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for part in content:
            kind = part.get("type")
            if kind == "image":
                found.append(("image", part.get("image")))
            elif kind == "image_url":
                url = part.get("image_url")
                found.append(("image", url.get("url") if isinstance(url, dict) else url))
            elif kind in ("video", "video_url", "input_audio", "audio_url"):
                found.append((kind.removesuffix("_url").removeprefix("input_"), part.get(kind)))
    return found


def resize_target_pixels(hf_sub_processor: Any) -> int | None:
    """The most pixels the Hugging Face image or video processor resizes to, where it resizes to a pixel budget;
    None where it does not (then nothing is shrunk before it)."""
    if hf_sub_processor is None or not any(cls.__name__ in _PIXEL_BUDGET_PROCESSORS
                                           for cls in type(hf_sub_processor).__mro__):
        return None
    size = getattr(hf_sub_processor, "size", None)
    longest = size.get("longest_edge") if isinstance(size, dict) else getattr(size, "longest_edge", None)
    longest = longest or getattr(hf_sub_processor, "max_pixels", None)
    return int(longest) if longest else None


@dataclass
class _RequestBytes:
    """Decoded RGB bytes a request holds at its peak: what every item keeps, plus the largest decode in flight
    (items decode one at a time; while one decodes, its full-size pixels exist beside everything kept)."""

    limit: int
    kept: int = 0
    decoding: int = 0

    @property
    def peak(self) -> int:
        return self.kept + self.decoding

    def room(self, decoding: int) -> int:
        """Bytes an item may still keep if it decodes `decoding` bytes at a time."""
        return self.limit - self.kept - max(self.decoding, decoding)

    def add(self, label: str, kept: int, decoding: int) -> None:
        kept_after, decoding_after = self.kept + kept, max(self.decoding, decoding)
        if kept_after + decoding_after > self.limit:
            raise MediaError(f"{label}: decoding it would bring the request's media to "
                             f"{mib(kept_after + decoding_after)} of RGB, over the limit of {mib(self.limit)} per "
                             "request (--max-mm-bytes-per-request)")
        self.kept, self.decoding = kept_after, decoding_after


def _labels(media: list[tuple[str, Any]]) -> list[str]:
    """'image 0', 'video 0', 'image 1', ...: each item numbered within its modality, as messages name them."""
    counts: dict[str, int] = {}
    labels = []
    for modality, _ in media:
        labels.append(f"{modality} {counts.get(modality, 0)}")
        counts[modality] = counts.get(modality, 0) + 1
    return labels


def _is_http(source: Any) -> bool:
    return isinstance(source, str) and source.lstrip()[:8].lower().startswith(("http://", "https://"))


class MultimodalProcessor:
    def __init__(self, args: ServerArgs, model_cls: type, hf_config: Any, folder: Path):
        from transformers import AutoProcessor

        self.model_cls = model_cls
        self.hf_config = hf_config
        self.hf = AutoProcessor.from_pretrained(folder, trust_remote_code=args.trust_remote_code)
        self.policy = MediaPolicy(allowed_local_media_path=args.allowed_local_media_path,
                                  allow_private_urls=args.allow_private_media_urls,
                                  fetch_timeout_s=args.media_fetch_timeout,
                                  min_bytes_per_s=args.media_min_bytes_per_s,
                                  video_decode_timeout_s=args.video_decode_timeout,
                                  max_bytes_per_request=args.max_mm_bytes_per_request * _MIB,
                                  max_bytes_in_flight=args.max_mm_bytes_in_flight * _MIB)
        self.memory = MediaMemory(self.policy.max_bytes_in_flight, self.policy.in_flight_wait_s)
        # Downloads wait on the network, not the CPU: a pool of their own, larger than the CPU workers
        # (--mm-processor-workers), so slow servers cannot hold the threads other requests decode in. Threads
        # start on demand.
        self.download_pool = ThreadPoolExecutor(max(16, 8 * args.mm_processor_workers),
                                                thread_name_prefix="mmserve-fetch")
        self.image_target_pixels = resize_target_pixels(getattr(self.hf, "image_processor", None))
        self.frame_target_pixels = resize_target_pixels(getattr(self.hf, "video_processor", None))
        self.video = dict(_DEFAULT_VIDEO)
        if args.mm_process_config:
            try:
                self.video.update(json.loads(args.mm_process_config).get("video", {}))
            except (ValueError, AttributeError) as exc:
                raise ValueError(f"--mm-process-config must be JSON like '{{\"video\": {{\"fps\": 1}}}}', "
                                 f"got {args.mm_process_config!r}") from exc
        self.limits = dict(_DEFAULT_LIMITS)
        if args.limit_mm_per_prompt:
            try:
                self.limits.update({str(k): int(v) for k, v in json.loads(args.limit_mm_per_prompt).items()})
            except (ValueError, AttributeError) as exc:
                raise ValueError(f"--limit-mm-per-prompt must be a JSON object like '{{\"image\": 8}}', "
                                 f"got {args.limit_mm_per_prompt!r}") from exc

    def check_counts(self, media: list[tuple[str, Any]]) -> None:
        counts: dict[str, int] = {}
        for modality, _ in media:
            counts[modality] = counts.get(modality, 0) + 1
        for modality, count in counts.items():
            if modality not in ("image", "video"):
                raise MediaError(f"{modality} input is not supported for this model yet")
            if count > self.limits.get(modality, 0):
                raise MediaError(f"too many {modality}s: {count} in one prompt, the limit is "
                                 f"{self.limits.get(modality, 0)} (--limit-mm-per-prompt)")

    def download(self, media: list[tuple[str, Any]]) -> list[Future]:
        """Start downloading every http(s) source in the download pool. Each future gives its item back as
        (modality, source), a URL replaced by the bytes it served; other sources are ready at once. The counts
        are checked first, so a request over the limits starts no download."""
        self.check_counts(media)
        futures: list[Future] = []
        for (modality, source), label in zip(media, _labels(media), strict=True):
            if isinstance(source, dict):  # {"url": ...}, as video_url parts carry it
                source = source.get("url")
            if _is_http(source):
                futures.append(self.download_pool.submit(self._fetch, modality, source, label))
            else:
                ready: Future = Future()
                ready.set_result((modality, source))
                futures.append(ready)
        return futures

    def _fetch(self, modality: str, url: str, label: str) -> tuple[str, bytes]:
        return modality, fetch_bytes(url, self.policy, label)

    def process(self, text: str, media: list[tuple[str, Any]]) -> tuple[list[int], MultimodalInputs]:
        futures = self.download(media)  # nothing left to download when the server's process_media called it
        wait(futures, return_when=FIRST_EXCEPTION)
        for future in futures:  # the first failure answers at once, without waiting for slower downloads
            if future.done() and future.exception() is not None:
                raise future.exception()
        media = [future.result() for future in futures]
        labels = _labels(media)
        budget = _RequestBytes(self.policy.max_bytes_per_request)
        with ExitStack() as stack:
            # Headers first: every item's decoded size is known and budgeted before any pixel is decoded.
            images: list[PendingImage] = []
            for (modality, source), label in zip(media, labels, strict=True):
                if modality == "image":
                    image = stack.enter_context(open_image(source, self.policy, label, self.image_target_pixels))
                    budget.add(label, image.kept_bytes, image.decode_bytes)
                    images.append(image)
            videos = [(modality, source, label) for (modality, source), label in zip(media, labels, strict=True)
                      if modality == "video"]
            plans = []
            for i, (_, source, label) in enumerate(videos):
                plans.append(self._plan_video(source, label, budget, len(videos) - i, stack))
            # All of the request's bytes at once, until its processing is done (see MediaMemory).
            stack.enter_context(self.memory.hold(budget.peak))
            loaded_images = [image.load() for image in images]
            loaded_videos = [plan() for plan in plans]
            # The frames are sampled already; the metadata tells the processor when each was shot, which Qwen2.5-VL
            # turns into M-RoPE time steps and Qwen3-VL into "<t seconds>" text (without it they assume 24 fps, and
            # Qwen3-VL would sample again).
            video_kwargs = ({"video_metadata": [meta for _, meta in loaded_videos], "do_sample_frames": False}
                            if loaded_videos else {})
            processed = self.hf(text=[text], images=loaded_images or None,
                                videos=[frames for frames, _ in loaded_videos] or None, return_tensors="pt",
                                **video_kwargs)
        mm = self.model_cls.multimodal_inputs(self.hf_config, processed)
        return processed["input_ids"][0].tolist(), mm

    def _plan_video(self, source: Any, label: str, budget: _RequestBytes, videos_left: int,
                    stack: ExitStack) -> Callable[[], tuple[np.ndarray, dict[str, Any]]]:
        """Budget one video from its header and return the call that loads it: frames [T, H, W, 3] uint8 and their
        metadata (the video's fps, its frame count, the frames' indices).

        A video keeps at most `max_frames` (--mm-process-config), `policy.max_video_pixels` in all and an even
        share of the request's remaining bytes: past those it is sampled more sparsely rather than refused; it is
        refused only when not even one frame pair fits. An array passed in-process is taken as already sampled at
        the configured rate (`fps`, 2 by default)."""
        if isinstance(source, np.ndarray):
            if source.ndim != 4 or source.shape[-1] != 3 or len(source) == 0:
                raise MediaError(f"{label}: frames must be an array [frames, height, width, 3]")
            budget.add(label, source.nbytes, 0)
            metadata = video_metadata(float(self.video["fps"]), len(source), range(len(source)))
            return lambda: (source, metadata)
        reader: VideoReader = stack.enter_context(open_video(source, self.policy, label, self.frame_target_pixels))
        v = self.video
        cap = min(int(v["max_frames"]),
                  self.policy.max_video_pixels // (reader.frame_width * reader.frame_height),
                  budget.room(reader.decode_bytes) // videos_left // reader.frame_bytes)
        cap = max(cap, 2)  # one frame pair at least; `budget.add` refuses it if even that does not fit

        def choose(total: int, fps: float) -> np.ndarray:
            return sample_frame_indices(total, fps, float(v["fps"]), min(int(v["min_frames"]), cap), cap)

        # With a frame count in the header the frames are known now; without one, the whole video is read keeping
        # up to `cap` frames.
        frames = len(choose(reader.frame_count, reader.fps)) if reader.fps and reader.frame_count else cap
        budget.add(label, frames * reader.frame_bytes, reader.decode_bytes)

        def load() -> tuple[np.ndarray, dict[str, Any]]:
            clip: VideoClip = reader.sample(choose, max_frames=frames)
            return clip.frames, video_metadata(clip.fps, clip.total_frames, clip.indices)

        return load


def video_metadata(fps: float, total_frames: int, indices: Any) -> dict[str, Any]:
    """The Hugging Face video processors' metadata for frames `indices` of a video of `total_frames` at `fps`."""
    return {"fps": fps, "total_num_frames": total_frames, "frames_indices": [int(i) for i in indices]}
