"""MultimodalProcessor: prompt text with media placeholders + media sources -> expanded token ids and the
request's MultimodalInputs, through the model's Hugging Face processor and its family's processor side
(`multimodal/processors/`, found by architecture name: no model code is imported). Used by the in-process Engine and by
the API server (downloads in the processor's own pool, the rest in worker threads, off the event loop).

A request's media go through three steps: `download` (http(s) sources, concurrently, in a pool of their own so
slow servers never hold the CPU workers), then in `process` the headers are read and the decoded bytes budgeted
(per request, and across requests through `MediaMemory`) before any pixel is decoded, then each image or video not
in the processor cache is decoded (images shrunk while decoding where the model's processor would shrink them
anyway, videos sampled by seeking) and run through the Hugging Face processor alone, in the `--mm-processor-workers`
pool, several at once: the threads decode (that releases the GIL) and run the processor themselves or, with
`--mm-processor-pool process` (the default where there is a GPU), hand it to as many processes
(`processor_pool.py`: the processors' Python holds the GIL most of an image's time). The placeholders of the prompt are
expanded as the processor expanded each item, and the features joined, as one processor call over all items gives
them.

How media are prepared is a request's `MediaSettings`: the server's settings with the request's
`mm_processor_kwargs` applied (pixel bounds, frame rate and counts, whether a video brings its own sound), checked
against the model family's list. An item's cache key, and the hash the engine's caches know it by, are its content
digest plus those settings: the same image at another resolution is another encoder output."""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import threading
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmserve.config import ServerArgs
from mmserve.multimodal.inputs import MultimodalInputs, media_item_hash
from mmserve.multimodal.media import (
    MediaError,
    MediaMemory,
    MediaPolicy,
    VideoClip,
    VideoReader,
    fetch_bytes,
    media_bytes,
    media_digest,
    mib,
    open_audio,
    open_image,
    open_video,
    open_video_audio,
)
from mmserve.multimodal.processor_cache import ProcessedMedia, ProcessorCache
from mmserve.multimodal.processor_pool import ProcessorCrashed, ProcessorProcesses
from mmserve.multimodal.processors import ProcessorSpec

_MIB = 1024 * 1024
_DEFAULT_LIMITS = {"image": 16, "video": 2, "audio": 8}
# Qwen's video sampling: 2 frames a second, at least 4 and at most 768 frames, an even count (frame pairs)
_DEFAULT_VIDEO = {"fps": 2.0, "min_frames": 4, "max_frames": 768}
# Hugging Face processors that resize to a pixel budget (Qwen-VL's smart_resize): `size["longest_edge"]` is the
# most pixels an image, or a video frame, comes out with.
_PIXEL_BUDGET_PROCESSORS = frozenset({"Qwen2VLImageProcessor", "Qwen2VLImageProcessorPil", "Qwen2VLVideoProcessor",
                                      "Qwen3VLVideoProcessor"})

# The mm_processor_kwargs a request may give, by model family (the HF config's model_type), and the media each
# applies to: what the family's transformers processor takes. Pixel bounds go to the image processor and, where it
# takes them, the video processor (Qwen3-VL's video processor bounds a whole clip's volume instead); frame rate and
# counts steer mmserve's own frame sampling (the processor gets frames sampled already).
_PIXELS = ("min_pixels", "max_pixels")
_FRAMES = ("fps", "num_frames", "min_frames", "max_frames")
# A video's own sound interleaved with its frames by time (the family's spec has `video_with_audio`)
_FLAGS = ("use_audio_in_video",)
_REQUEST_KWARGS: dict[str, dict[str, tuple[str, ...]]] = {
    "qwen2_vl": {"image": _PIXELS, "video": _PIXELS + _FRAMES},
    "qwen2_5_vl": {"image": _PIXELS, "video": _PIXELS + _FRAMES},
    "qwen3_vl": {"image": _PIXELS, "video": _FRAMES},
    "qwen3_vl_moe": {"image": _PIXELS, "video": _FRAMES},
    "llava_onevision": {"video": _FRAMES},  # the LLaVA video families: mmserve's frame sampling only
    "llava_next_video": {"video": _FRAMES},
    "internvl": {"video": _FRAMES},  # tiling (max_patches) is the checkpoint's: not per request
    "qwen3_omni_moe_thinker": {"image": _PIXELS, "video": _FLAGS},
}
_MAX_FPS = 60.0  # a request's fps at most (or the server's own, if higher); the frame caps bound the work anyway
# Processor outputs that belong to the prompt's text, not to one item's features
_TEXT_OUTPUTS = frozenset({"input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids"})


class MediaSettingsError(MediaError):
    """A request's mm_processor_kwargs refused; `key` is the one at fault (None: the object itself)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class MediaSettings:
    """How one request's media are prepared: the server's settings with the request's mm_processor_kwargs applied.
    Part of every item's cache key and hash."""

    image_pixels: tuple[int, int] | None  # (min, max) pixels images are resized to; None: the processor's own
    video_pixels: tuple[int, int] | None  # the same for video frames
    fps: float  # video frames sampled per second
    num_frames: int | None  # or this many frames per video, whatever its length (within the caps)
    min_frames: int
    max_frames: int
    use_audio_in_video: bool = False  # each video's sound track decoded too and interleaved with its frames


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


def pixel_bounds(hf_sub_processor: Any) -> tuple[int, int] | None:
    """(min, max) pixels the Hugging Face image or video processor resizes to, where it resizes to a pixel budget."""
    longest = resize_target_pixels(hf_sub_processor)
    if longest is None:
        return None
    size = hf_sub_processor.size
    shortest = size.get("shortest_edge") if isinstance(size, dict) else getattr(size, "shortest_edge", None)
    return int(shortest or getattr(hf_sub_processor, "min_pixels", None) or 1), longest


@dataclass
class _RequestBytes:
    """The per-request limit on decoded RGB bytes, and what decides a video's frames: every item's kept bytes plus
    the largest decode, as if items decoded one at a time and all were kept until the last is done (while one
    decodes, its full-size pixels exist beside everything kept). It counts every item, cached or not, so what a
    request is refused and which frames a video keeps never depend on the processor cache. What a request holds
    while its items decode is `MultimodalProcessor._prepare_all`'s."""

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


@dataclass
class _Item:
    """One image or video of a request, its header read and its decoded size budgeted, its pixels not decoded yet."""

    modality: str
    label: str
    key: bytes  # content digest + the settings it is prepared with: its processor-cache key and its hashes' seed
    kept: int  # decoded RGB bytes it holds until processed
    decoding: int  # RGB bytes while it decodes
    load: Callable[[], Any]  # its decoded image, or its frames and their metadata
    audio: Callable[[], np.ndarray] | None = None  # a video's own sound (use_audio_in_video): its mono samples

    @property
    def peak(self) -> int:
        return self.kept + self.decoding


def _shown(value: Any) -> str:
    """A client's value as JSON spells it, for messages."""
    try:
        return json.dumps(value)[:100]
    except (TypeError, ValueError):
        return repr(value)[:100]


def _expands_from_a_grid(hf_processor: Any) -> bool:
    """Whether the processor expands an image placeholder from its grid alone (`replace_image_token` of its own:
    transformers 5.17's Qwen3-Omni processor inherits the base class's, which raises)."""
    from transformers import ProcessorMixin

    return any("replace_image_token" in vars(cls) for cls in type(hf_processor).__mro__ if cls is not ProcessorMixin)


def _media_key(modality: str, digest: bytes, *settings: Any) -> bytes:
    return media_digest(modality.encode(), digest, repr(settings).encode())


class MultimodalProcessor:
    def __init__(self, args: ServerArgs, spec: ProcessorSpec, hf_config: Any, folder: Path):
        """`spec`: the model family's processor side (`ProcessorRegistry.resolve(architectures)`)."""
        from transformers import AutoProcessor

        self.spec = spec
        self.hf_config = hf_config
        # transformers 5 loads the torchvision ("fast") image processor where there is one and torchvision is
        # installed, and video processors are torchvision-based: they run on `--mm-processor-device`.
        self.hf = AutoProcessor.from_pretrained(folder, trust_remote_code=args.trust_remote_code)
        self.device = args.mm_processor_device
        if self.device != "cpu" and not torch.cuda.is_available():
            raise ValueError(f"--mm-processor-device {self.device}: no CUDA GPU is available")
        self.policy = MediaPolicy(allowed_local_media_path=args.allowed_local_media_path,
                                  allow_private_urls=args.allow_private_media_urls,
                                  fetch_timeout_s=args.media_fetch_timeout,
                                  min_bytes_per_s=args.media_min_bytes_per_s,
                                  video_decode_timeout_s=args.video_decode_timeout,
                                  max_bytes_per_request=args.max_mm_bytes_per_request * _MIB,
                                  max_bytes_in_flight=args.max_mm_bytes_in_flight * _MIB,
                                  max_audio_seconds=args.max_audio_seconds, max_audio_bytes=args.max_audio_mb * _MIB)
        self.memory = MediaMemory(self.policy.max_bytes_in_flight, self.policy.in_flight_wait_s)
        self.cache = ProcessorCache(args.mm_processor_cache_mb * _MIB)
        # Downloads wait on the network, not the CPU: a pool of their own, larger than the CPU workers
        # (--mm-processor-workers), so slow servers cannot hold the threads other requests decode in. Threads
        # start on demand.
        self.download_pool = ThreadPoolExecutor(max(16, 8 * args.mm_processor_workers),
                                                thread_name_prefix="mmserve-fetch")
        # Decoding and the processor, one image or video per task, for all requests together.
        self.worker_count = args.mm_processor_workers
        self.workers = ThreadPoolExecutor(self.worker_count, thread_name_prefix="mmserve-mm")
        # The HF processor itself in as many processes (the threads decode, then wait for them), or in the threads
        pool = args.mm_processor_pool
        if pool == "auto":
            pool = "process" if torch.cuda.is_available() and self.device == "cpu" else "thread"
        if pool == "process" and self.device != "cpu":
            raise ValueError(f"--mm-processor-pool process runs the processor on the CPU; --mm-processor-device "
                             f"{self.device} needs --mm-processor-pool thread")
        self.processes = (ProcessorProcesses(folder, args.trust_remote_code, self.worker_count)
                          if pool == "process" else None)
        # An item processed while no other is runs in its thread: the hop to a process and back costs 2-5 ms of
        # copies, and one thread alone barely competes for the GIL
        self.inline_when_alone = True
        self._running = 0
        self._running_lock = threading.Lock()
        # Images normalised and patched in the engine, on its device (--mm-image-prep): this process resizes each
        # image, expands its placeholder from the grid and sends it as uint8, an eighth of the processor's bytes
        # (a checkpoint whose processor does not resize keeps it all here: the plan resizes)
        self.images_in_engine = (args.images_prepared_in_engine() and spec.image_grid is not None
                                 and getattr(getattr(self.hf, "image_processor", None), "do_resize", False)
                                 and _expands_from_a_grid(self.hf))
        self.image_target_pixels = resize_target_pixels(getattr(self.hf, "image_processor", None))
        self.audio_rate = int(getattr(getattr(self.hf, "feature_extractor", None), "sampling_rate", 16000))
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
        self.family = getattr(hf_config, "model_type", "")
        self.request_kwargs = _REQUEST_KWARGS.get(self.family, {})
        self.image_pixels = pixel_bounds(getattr(self.hf, "image_processor", None))
        self.video_pixels = pixel_bounds(getattr(self.hf, "video_processor", None))
        # What min_pixels and max_pixels may ask for: a bigger resize is a bigger tensor (and more tokens)
        self.pixel_limit_source = ("the server's limit, --mm-max-pixels" if args.mm_max_pixels else
                                   "the model processor's maximum; --mm-max-pixels raises it")
        self.max_request_pixels = args.mm_max_pixels or max(
            [bounds[1] for modality, bounds in (("image", self.image_pixels), ("video", self.video_pixels))
             if bounds is not None and "max_pixels" in self.request_kwargs.get(modality, ())], default=1)
        self.default_settings = MediaSettings(image_pixels=None, video_pixels=None, fps=float(self.video["fps"]),
                                              num_frames=None, min_frames=int(self.video["min_frames"]),
                                              max_frames=int(self.video["max_frames"]))
        # Each placeholder token, and how many tokens the tokenizer puts around it alone (expansions are cut out of
        # the processor's ids for the placeholder alone)
        self.placeholders: dict[int, str] = {}
        self.wrapping: dict[str, tuple[int, int]] = {}
        # Text the HF processor puts before every prompt (Janus's default system prompt) is part of each item's
        # processor output and cut off with the rest of the wrapping; the family's hook refuses what we cannot match
        prefix = spec.text_prefix(self.hf, args.chat_template) if spec.text_prefix is not None else ""
        self._text_prefix = prefix
        for modality in ("image", "video", "audio"):
            token = getattr(self.hf, f"{modality}_token", None)
            token_id = getattr(self.hf, f"{modality}_token_id", None)
            if token is not None and token_id is None and token in self.hf.tokenizer.get_vocab():
                token_id = self.hf.tokenizer.convert_tokens_to_ids(token)  # InternVL names its video token only
            if token is None or token_id is None:
                continue
            alone = self.hf.tokenizer(prefix + token)["input_ids"]
            if alone.count(token_id) != 1:
                raise ValueError(f"the tokenizer does not keep the {modality} placeholder {token!r} as one token")
            self.placeholders[token_id] = modality
            self.wrapping[modality] = (alone.index(token_id), len(alone) - alone.index(token_id) - 1)
        if self.images_in_engine:
            self._check_image_plan()

    def close(self) -> None:
        """Stop the worker threads and processes (queued work is dropped)."""
        self.workers.shutdown(wait=False, cancel_futures=True)
        self.download_pool.shutdown(wait=False, cancel_futures=True)
        if self.processes is not None:
            self.processes.shutdown()

    # ----- per-request settings

    def settings_for(self, kwargs: dict[str, Any] | None) -> MediaSettings:
        """A request's MediaSettings from its mm_processor_kwargs; MediaSettingsError names a key the model family
        does not take or a value out of range."""
        if not kwargs:
            return self.default_settings
        if not isinstance(kwargs, dict):
            raise MediaSettingsError(f"mm_processor_kwargs must be an object, got {type(kwargs).__name__}")
        allowed = [key for key in (*_PIXELS, *_FRAMES, *_FLAGS)
                   if any(key in keys for keys in self.request_kwargs.values())]
        for key, value in kwargs.items():
            if key not in allowed:
                takes = ", ".join(allowed) if allowed else "none"
                raise MediaSettingsError(f"mm_processor_kwargs: unknown key {key!r} for this model "
                                         f"({self.family or 'unknown family'} takes: {takes})", key)
            self._check_value(key, value)
        if "fps" in kwargs and "num_frames" in kwargs:
            raise MediaSettingsError("mm_processor_kwargs: fps and num_frames are mutually exclusive", "num_frames")
        for low, high in (("min_pixels", "max_pixels"), ("min_frames", "max_frames")):
            if low in kwargs and high in kwargs and kwargs[low] > kwargs[high]:
                raise MediaSettingsError(f"mm_processor_kwargs: {low} ({kwargs[low]}) must not exceed {high} "
                                         f"({kwargs[high]})", low)
        d = self.default_settings
        return MediaSettings(image_pixels=self._pixels("image", self.image_pixels, kwargs),
                             video_pixels=self._pixels("video", self.video_pixels, kwargs),
                             fps=float(kwargs.get("fps", d.fps)), num_frames=kwargs.get("num_frames"),
                             min_frames=kwargs.get("min_frames", d.min_frames),
                             max_frames=kwargs.get("max_frames", d.max_frames),
                             use_audio_in_video=kwargs.get("use_audio_in_video", False))

    def _check_value(self, key: str, value: Any) -> None:
        if key == "fps":
            highest = max(_MAX_FPS, float(self.video["fps"]))
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise MediaSettingsError(f"mm_processor_kwargs.fps must be a number, got {_shown(value)}", key)
            if not 0 < value <= highest:  # NaN fails this too
                raise MediaSettingsError(f"mm_processor_kwargs.fps must be in (0, {highest:g}], got {value}", key)
            return
        if key in _FLAGS:
            if not isinstance(value, bool):
                raise MediaSettingsError(f"mm_processor_kwargs.{key} must be true or false, got {_shown(value)}", key)
            return
        if isinstance(value, bool) or not isinstance(value, int):
            raise MediaSettingsError(f"mm_processor_kwargs.{key} must be an integer, got {_shown(value)}", key)
        if key in _PIXELS:
            highest, why = self.max_request_pixels, self.pixel_limit_source
        else:
            highest, why = int(self.video["max_frames"]), "the server's max_frames, --mm-process-config"
        if not 1 <= value <= highest:
            raise MediaSettingsError(f"mm_processor_kwargs.{key} must be in [1, {highest}] ({why}), got {value}", key)

    def _pixels(self, modality: str, bounds: tuple[int, int] | None,
                kwargs: dict[str, Any]) -> tuple[int, int] | None:
        """The (min, max) pixels a modality is resized to under `kwargs`; None where that is the processor's own."""
        takes = self.request_kwargs.get(modality, ())
        if bounds is None or not any(key in kwargs and key in takes for key in _PIXELS):
            return None
        pixels = (kwargs.get("min_pixels", bounds[0]), kwargs.get("max_pixels", bounds[1]))
        return None if pixels == bounds else pixels

    # ----- media

    def check_counts(self, media: list[tuple[str, Any]]) -> None:
        counts: dict[str, int] = {}
        for modality, _ in media:
            counts[modality] = counts.get(modality, 0) + 1
        for modality, count in counts.items():
            if modality == "audio" and "audio" not in self.wrapping:
                name = (getattr(self.hf_config, "architectures", None) or [self.family or "this model"])[0]
                raise MediaError(f"{name} takes no audio input")
            if modality not in ("image", "video", "audio"):
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
            # {"url": ...}, as video_url and audio_url parts carry it (input_audio's {"data", "format"} stays)
            if isinstance(source, dict) and (modality != "audio" or "url" in source):
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

    def process(self, text: str, media: list[tuple[str, Any]],
                settings: MediaSettings | None = None) -> tuple[list[int], MultimodalInputs]:
        settings = settings or self.default_settings
        futures = self.download(media)  # nothing left to download when the server's process_media called it
        wait(futures, return_when=FIRST_EXCEPTION)
        for future in futures:  # the first failure answers at once, without waiting for slower downloads
            if future.done() and future.exception() is not None:
                raise future.exception()
        media = [future.result() for future in futures]
        labels = _labels(media)
        budget = _RequestBytes(self.policy.max_bytes_per_request)
        items: list[_Item | None] = [None] * len(media)
        with ExitStack() as stack:
            # Headers first: every item's decoded size is budgeted, and its cache key known, before any pixel is
            # decoded. Images first, then videos share what room is left.
            for i, ((modality, source), label) in enumerate(zip(media, labels, strict=True)):
                if modality == "image":
                    items[i] = self._plan_image(source, label, settings, budget, stack)
            videos = [i for i, (modality, _) in enumerate(media) if modality == "video"]
            for n, i in enumerate(videos):
                items[i] = self._plan_video(media[i][1], labels[i], settings, budget, len(videos) - n, stack)
            for i, ((modality, source), label) in enumerate(zip(media, labels, strict=True)):
                if modality == "audio":
                    items[i] = self._plan_audio(source, label, budget, stack)
            outputs = self._prepare_all(items, settings)
        return self._assemble(text, items, outputs)

    def _plan_image(self, source: Any, label: str, settings: MediaSettings, budget: _RequestBytes,
                    stack: ExitStack) -> _Item:
        target = settings.image_pixels[1] if settings.image_pixels else self.image_target_pixels
        if isinstance(source, Image.Image):  # in-process: its pixels are its content
            digest = media_digest(repr((source.mode, source.size)).encode(), source.tobytes())
        else:
            source = media_bytes(source, "image", self.policy, label)
            digest = media_digest(source)
        image = stack.enter_context(open_image(source, self.policy, label, target))
        budget.add(label, image.kept_bytes, image.decode_bytes)
        return _Item("image", label, _media_key("image", digest, settings.image_pixels), image.kept_bytes,
                     image.decode_bytes, image.load)

    def _plan_video(self, source: Any, label: str, settings: MediaSettings, budget: _RequestBytes, videos_left: int,
                    stack: ExitStack) -> _Item:
        """Budget one video from its header: the item whose `load` gives frames [T, H, W, 3] uint8 and their metadata
        (the video's fps, its frame count, the frames' indices).

        A video keeps at most `max_frames` (--mm-process-config, or the request's), `policy.max_video_pixels` in all
        and an even share of the request's remaining bytes: past those it is sampled more sparsely rather than
        refused; it is refused only when not even one frame pair fits. An array passed in-process is taken as
        already sampled at the configured rate (`fps`, 2 by default)."""
        if isinstance(source, np.ndarray):
            if source.ndim != 4 or source.shape[-1] != 3 or len(source) == 0:
                raise MediaError(f"{label}: frames must be an array [frames, height, width, 3]")
            if settings.use_audio_in_video:
                raise MediaError(f"{label}: frames given as an array have no sound track for use_audio_in_video; "
                                 "send the video file")
            budget.add(label, source.nbytes, 0)
            metadata = video_metadata(settings.fps, len(source), range(len(source)))
            digest = media_digest(repr((source.shape, source.dtype.str)).encode(), source.tobytes())
            return _Item("video", label, _media_key("video", digest, settings.video_pixels, settings.fps),
                         source.nbytes, 0, lambda: (source, metadata))
        data = media_bytes(source, "video", self.policy, label)
        target = settings.video_pixels[1] if settings.video_pixels else self.frame_target_pixels
        reader: VideoReader = stack.enter_context(open_video(data, self.policy, label, target))
        cap = min(settings.max_frames,
                  self.policy.max_video_pixels // (reader.frame_width * reader.frame_height),
                  budget.room(reader.decode_bytes) // videos_left // reader.frame_bytes)
        cap = max(cap, 2)  # one frame pair at least; `budget.add` refuses it if even that does not fit

        def choose(total: int, fps: float) -> np.ndarray:
            if settings.num_frames is not None:
                count = min(settings.num_frames, cap, total)
                return sample_frame_indices(total, fps, settings.fps, count, count)
            return sample_frame_indices(total, fps, settings.fps, min(settings.min_frames, cap), cap)

        # With a frame count in the header the frames are known now; without one, the whole video is read keeping
        # up to `cap` frames.
        frames = len(choose(reader.frame_count, reader.fps)) if reader.fps and reader.frame_count else cap
        budget.add(label, frames * reader.frame_bytes, reader.decode_bytes)

        def load() -> tuple[np.ndarray, dict[str, Any]]:
            clip: VideoClip = reader.sample(choose, max_frames=frames)
            return clip.frames, video_metadata(clip.fps, clip.total_frames, clip.indices)

        sound, sound_bytes = None, 0
        if settings.use_audio_in_video:  # the whole track, budgeted as an audio part's samples are
            track = stack.enter_context(open_video_audio(data, self.policy, label))
            sound_bytes = track.decoded_bytes(self.audio_rate)
            budget.add(label, sound_bytes, sound_bytes)
            sound = functools.partial(track.load, self.audio_rate)
        # The frames follow from the bytes, the sampling settings and the cap: together they are the key (and the
        # sound, decoded from the same bytes, whether it is taken).
        key = _media_key("video", media_digest(data), settings.video_pixels, settings.fps, settings.num_frames,
                         settings.min_frames, cap, settings.use_audio_in_video and self.audio_rate)
        return _Item("video", label, key, frames * reader.frame_bytes + sound_bytes,
                     max(reader.decode_bytes, sound_bytes), load, sound)

    def _plan_audio(self, source: Any, label: str, budget: _RequestBytes, stack: ExitStack) -> _Item:
        """Budget one audio clip from its header: the item whose `load` gives mono float32 samples at the feature
        extractor's rate. An array passed in-process is taken as such samples already."""
        rate = self.audio_rate
        if isinstance(source, np.ndarray):
            if source.ndim != 1 or not len(source):
                raise MediaError(f"{label}: samples must be a non-empty 1-D array (mono, at {rate} Hz)")
            if len(source) > self.policy.max_audio_seconds * rate:
                raise MediaError(f"{label}: the clip is {len(source) / rate:.1f} s long, over the limit of "
                                 f"{self.policy.max_audio_seconds:g} s (--max-audio-seconds)")
            samples = source.astype(np.float32)
            budget.add(label, samples.nbytes, 0)
            return _Item("audio", label, _media_key("audio", media_digest(samples.tobytes()), rate), samples.nbytes,
                         0, lambda: samples)
        data = media_bytes(source, "audio", self.policy, label)
        clip = stack.enter_context(open_audio(data, self.policy, label))
        size = clip.decoded_bytes(rate)
        budget.add(label, size, size)
        return _Item("audio", label, _media_key("audio", media_digest(data), rate), size, size,
                     lambda: clip.load(rate))

    # ----- the processor

    def _prepare_all(self, items: list[_Item], settings: MediaSettings) -> dict[bytes, ProcessedMedia]:
        """Every item's processor output by key: from the cache, or decoded and processed in the worker pool.

        Items to decode run as many at once as there are workers, as far as the sum of their peaks (decoded bytes
        kept and decoding) fits in the per-request limit and the server's in-flight budget; the request holds that
        much (MediaMemory) meanwhile, or the largest item's peak when that is more: it then runs alone."""
        outputs: dict[bytes, ProcessedMedia] = {}
        missing: dict[bytes, _Item] = {}
        for item in items:
            if item.key in outputs or item.key in missing:
                continue  # the same media twice in one request: prepared once
            hit = self.cache.get(item.key)
            if hit is not None:
                outputs[item.key] = hit
            else:
                missing[item.key] = item
        if not missing:
            return outputs
        peaks = sorted((item.peak for item in missing.values()), reverse=True)
        room = max(peaks[0], min(sum(peaks[:self.worker_count]), self.policy.max_bytes_per_request,
                                 self.memory.capacity))
        queue = deque(missing.values())
        running: dict[Future, _Item] = {}
        in_flight = 0
        error: BaseException | None = None
        with self.memory.hold(room):
            while queue or running:
                while queue and (not running or in_flight + queue[0].peak <= room):
                    item = queue.popleft()
                    in_flight += item.peak
                    running[self.workers.submit(self._prepare, item, settings)] = item
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    item = running.pop(future)
                    in_flight -= item.peak
                    if future.exception() is not None:
                        error = error or future.exception()
                        queue.clear()  # start nothing more; those running finish within what is held
                    else:
                        outputs[item.key] = future.result()
                        self.cache.put(item.key, outputs[item.key])
        if error is not None:
            raise error
        return outputs

    def _plan_in_engine(self, image: Image.Image, bounds: tuple[int, int]) -> ProcessedMedia:
        """An image for the engine to process: resized here by the image processor's own resize, on the CPU as the
        reference runs it (a GPU's resize rounds some pixels differently), and sent as RGB [1, 3, H, W] uint8;
        the engine rescales, normalises and cuts it into patches, the float work that is most of the processor's
        time and bytes. The placeholder is expanded from the grid as the Hugging Face processor expands it."""
        from transformers.image_transforms import convert_to_rgb
        from transformers.image_utils import SizeDict

        processor = self.hf.image_processor
        rgb = np.array(convert_to_rgb(image))  # a writable copy, as torch.from_numpy wants
        grid = self.spec.image_grid(processor, rgb.shape[0], rgb.shape[1], bounds)
        pixels = processor.resize(torch.from_numpy(rgb).permute(2, 0, 1)[None].contiguous(),
                                  SizeDict(shortest_edge=bounds[0], longest_edge=bounds[1]),
                                  processor.resample, factor=processor.patch_size * processor.merge_size)
        text = self.hf.replace_image_token({"image_grid_thw": torch.tensor([grid])}, image_idx=0)
        before, after = self.wrapping["image"]
        ids = self.hf.tokenizer(self._text_prefix + text)["input_ids"]
        features = {"image_uint8": pixels, "image_grid_thw": torch.tensor([grid])}
        return ProcessedMedia(features, tuple(ids[before:len(ids) - after]))

    def _check_image_plan(self) -> None:
        """Refuse at startup a family whose image plan the Hugging Face processor disagrees with: the expansion
        and grid planned for a test image must be what the processor gives."""
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 75, 3), dtype=np.uint8))
        planned = self._plan_in_engine(image, self.image_pixels)
        out = self.hf(text=[self.hf.image_token], images=[image], return_tensors="pt")
        before, after = self.wrapping["image"]
        ids = out["input_ids"][0].tolist()
        if (tuple(ids[before:len(ids) - after]) != planned.token_ids
                or out["image_grid_thw"].tolist() != planned.features["image_grid_thw"].tolist()):
            raise ValueError(f"--mm-image-prep engine: the image plan of {type(self.hf).__name__} does not match "
                             "its processor; use --mm-image-prep api")

    def _prepare(self, item: _Item, settings: MediaSettings) -> ProcessedMedia:
        """Decode one image or video and run the model's processor on it alone (in a worker thread), or, for an
        image the engine prepares, only plan it. A video with its sound: its frames and its sound track each through
        the processor alone, then interleaved by the family's `video_with_audio`."""
        if item.audio is not None:
            video = self._prepare(dataclasses.replace(item, audio=None), settings)
            sound = self._prepare(_Item("audio", item.label, item.key, 0, 0, item.audio), settings)
            return self.spec.video_with_audio(self.hf, self.hf_config, video, sound)
        loaded = item.load()
        if item.modality == "image" and self.images_in_engine:
            return self._plan_in_engine(loaded, settings.image_pixels or self.image_pixels)
        kwargs: dict[str, Any] = {"text": [getattr(self.hf, f"{item.modality}_token")], "return_tensors": "pt"}
        if item.modality == "image":
            kwargs["images"] = [loaded]
            pixels = settings.image_pixels
        elif item.modality == "audio":
            kwargs.update(audio=[loaded], sampling_rate=self.audio_rate)
            pixels = None
        else:
            frames, metadata = loaded
            # The frames are sampled already; the metadata tells the processor when each was shot, which Qwen2.5-VL
            # turns into M-RoPE time steps and Qwen3-VL into "<t seconds>" text (without it they assume 24 fps, and
            # Qwen3-VL would sample again).
            kwargs.update(videos=[frames], video_metadata=[metadata], do_sample_frames=False)
            pixels = settings.video_pixels
        sub = {}
        if pixels is not None:
            sub["size"] = {"shortest_edge": pixels[0], "longest_edge": pixels[1]}
        if self.device != "cpu":
            sub["device"] = self.device
        if sub:
            kwargs["images_kwargs" if item.modality == "image" else "videos_kwargs"] = sub
        with self._running_lock:
            self._running += 1
            alone = self._running == 1
        try:
            if self.processes is None or (alone and self.inline_when_alone):
                out = self.hf(**kwargs)
            else:
                media = {"image": "images", "video": "videos", "audio": "audio"}[item.modality]
                try:
                    out = self.processes({k: v for k, v in kwargs.items() if k != media}, media, kwargs[media])
                except ProcessorCrashed as exc:
                    raise MediaError(f"{item.label}: the model's processor failed on it") from exc
        finally:
            with self._running_lock:
                self._running -= 1
        ids = out["input_ids"][0].tolist()
        before, after = self.wrapping[item.modality]
        features = {name: value.cpu() for name, value in out.items()
                    if name not in _TEXT_OUTPUTS and isinstance(value, torch.Tensor)}
        if self.spec.keeps_placeholder:
            return ProcessedMedia(features, (getattr(self.hf, f"{item.modality}_token_id"),))
        return ProcessedMedia(features, tuple(ids[before:len(ids) - after]))

    def _expand_ids(self, text: str, by_modality: dict[str, Iterator[_Item]],
                    outputs: dict[bytes, ProcessedMedia]) -> tuple[list[int], list[tuple[int, bytes]]]:
        """The prompt tokenised, each placeholder token replaced by its item's expansion ids; and (where each
        item's expansion starts, its key)."""
        ids: list[int] = []
        spans: list[tuple[int, bytes]] = []
        for token in self.hf.tokenizer(text)["input_ids"]:
            modality = self.placeholders.get(token)
            if modality is None:
                ids.append(token)
                continue
            item = next(by_modality[modality], None)
            if item is None:
                raise MediaError(f"the prompt has more {modality} placeholders than {modality}s")
            spans.append((len(ids), item.key))
            ids.extend(outputs[item.key].token_ids)
        return ids, spans

    def _expand_in_text(self, text: str, by_modality: dict[str, Iterator[_Item]],
                        outputs: dict[bytes, ProcessedMedia]) -> tuple[list[int], list[tuple[int, bytes]]]:
        """As `_expand_ids`, for processors that put plain text around an item's tokens (Gemma 3's "\n\n" before
        and after each image): that text merges with the prompt's neighbouring text when transformers tokenises
        the expanded prompt, so the placeholders are expanded in the text and the whole is tokenised once. An
        item's expansion is then found by its core, from its first to its last special token, which tokenises
        the same anywhere."""
        tokenizer = self.hf.tokenizer
        special = set(tokenizer.all_special_ids) | set(self.placeholders)
        special |= {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        names = {getattr(self.hf, f"{modality}_token"): modality for modality in self.placeholders.values()}
        pieces: list[str] = []
        cores: list[tuple[tuple[int, ...], int, bytes]] = []  # (core ids, core start in the expansion, key)
        for piece in re.split("(" + "|".join(map(re.escape, names)) + ")", text) if names else [text]:
            modality = names.get(piece)
            if modality is None:
                pieces.append(piece)
                continue
            item = next(by_modality[modality], None)
            if item is None:
                raise MediaError(f"the prompt has more {modality} placeholders than {modality}s")
            expansion = outputs[item.key].token_ids
            marks = [i for i, token in enumerate(expansion) if token in special]
            assert marks, "an item's expansion holds special tokens"
            cores.append((tuple(expansion[marks[0]:marks[-1] + 1]), marks[0], item.key))
            pieces.append(tokenizer.decode(list(expansion), skip_special_tokens=False,
                                           clean_up_tokenization_spaces=False))
        ids = tokenizer("".join(pieces))["input_ids"]
        spans: list[tuple[int, bytes]] = []
        at = 0
        for core, lead, key in cores:
            found = next((p for p in range(at, len(ids) - len(core) + 1)
                          if ids[p] == core[0] and tuple(ids[p:p + len(core)]) == core), None)
            if found is None:
                raise MediaError("an image's tokens did not survive tokenisation of the expanded prompt")
            spans.append((found - lead, key))
            at = found + len(core)
        return ids, spans

    def _assemble(self, text: str, items: list[_Item],
                  outputs: dict[bytes, ProcessedMedia]) -> tuple[list[int], MultimodalInputs]:
        """The prompt's ids with each placeholder expanded as the processor expanded its item, the items' features
        joined in order, cut into MultimodalInputs by the family's spec; each MultimodalItem hashed from its media's
        key and where it starts in that media's expansion."""
        by_modality: dict[str, Iterator[_Item]] = {
            modality: iter([item for item in items if item.modality == modality])
            for modality in ("image", "video", "audio")}
        if self.spec.expand_placeholders_in_text:
            ids, spans = self._expand_in_text(text, by_modality, outputs)
        else:
            ids, spans = self._expand_ids(text, by_modality, outputs)
        for modality, left in by_modality.items():
            if next(left, None) is not None:
                raise MediaError(f"the prompt has fewer {modality} placeholders than {modality}s")
        processed: dict[str, Any] = {"input_ids": torch.tensor([ids])}
        for item in items:
            for name, value in outputs[item.key].features.items():
                processed.setdefault(name, []).append(value)
        for name in list(processed)[1:]:
            parts = processed[name]
            if len({part.shape[1:] for part in parts}) > 1:  # items of other shapes (LLaVA-NeXT tiles): a list
                continue
            processed[name] = parts[0] if len(parts) == 1 else torch.cat(parts)
        mm = self.spec.multimodal_inputs(self.hf_config, processed)
        starts = [start for start, _ in spans]
        for mm_item in mm.items:
            if mm_item.offset < starts[0]:  # text ahead of all media whose states depend on all of them (Mllama)
                text = b"".join(t.to_bytes(8, "little") for t in ids[mm_item.offset:mm_item.end])
                mm_item.hash = media_item_hash(b"".join(key for _, key in spans) + text, 0)
                continue
            start, key = spans[bisect_right(starts, mm_item.offset) - 1]
            # a hash the spec set marks a variant of the media that encodes differently (Phi-4's audio beside images)
            variant = mm_item.hash.to_bytes(8, "little") if mm_item.hash else b""
            mm_item.hash = media_item_hash(key + variant, mm_item.offset - start)
        return ids, mm


def video_metadata(fps: float, total_frames: int, indices: Any) -> dict[str, Any]:
    """The Hugging Face video processors' metadata for frames `indices` of a video of `total_frames` at `fps`."""
    return {"fps": fps, "total_num_frames": total_frames, "frames_indices": [int(i) for i in indices]}
