"""MultimodalProcessor: prompt text with media placeholders + media sources -> expanded token ids and the
request's MultimodalInputs, through the model's Hugging Face processor. Used by the in-process Engine and by
the API server (in a thread pool, off the event loop)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from mmserve.config import ServerArgs
from mmserve.multimodal.inputs import MultimodalInputs
from mmserve.multimodal.media import MediaError, MediaPolicy, load_image, load_video_frames

_DEFAULT_LIMITS = {"image": 16, "video": 2}
# Qwen's video sampling: 2 frames a second, at least 4 and at most 768 frames, an even count (frame pairs)
_DEFAULT_VIDEO = {"fps": 2.0, "min_frames": 4, "max_frames": 768}


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


class MultimodalProcessor:
    def __init__(self, args: ServerArgs, model_cls: type, hf_config: Any, folder: Path):
        from transformers import AutoProcessor

        self.model_cls = model_cls
        self.hf_config = hf_config
        self.hf = AutoProcessor.from_pretrained(folder, trust_remote_code=args.trust_remote_code)
        self.policy = MediaPolicy(allowed_local_media_path=args.allowed_local_media_path,
                                  allow_private_urls=args.allow_private_media_urls)
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

    def process(self, text: str, media: list[tuple[str, Any]]) -> tuple[list[int], MultimodalInputs]:
        counts: dict[str, int] = {}
        for modality, _ in media:
            counts[modality] = counts.get(modality, 0) + 1
        for modality, count in counts.items():
            if modality not in ("image", "video"):
                raise MediaError(f"{modality} input is not supported for this model yet")
            if count > self.limits.get(modality, 0):
                raise MediaError(f"too many {modality}s: {count} in one prompt, the limit is "
                                 f"{self.limits.get(modality, 0)} (--limit-mm-per-prompt)")
        images = [load_image(src, self.policy, f"image {i}")
                  for i, src in enumerate(src for kind, src in media if kind == "image")]
        videos = [self._video(src, f"video {i}")
                  for i, src in enumerate(src for kind, src in media if kind == "video")]
        # The frames are sampled already; the metadata tells the processor when each was shot, which Qwen2.5-VL turns
        # into M-RoPE time steps and Qwen3-VL into "<t seconds>" text (without it they assume 24 fps, and Qwen3-VL
        # would sample again).
        video_kwargs = ({"video_metadata": [meta for _, meta in videos], "do_sample_frames": False} if videos
                        else {})
        processed = self.hf(text=[text], images=images or None, videos=[frames for frames, _ in videos] or None,
                            return_tensors="pt", **video_kwargs)
        mm = self.model_cls.multimodal_inputs(self.hf_config, processed)
        return processed["input_ids"][0].tolist(), mm

    def _video(self, source: Any, label: str) -> tuple[np.ndarray, dict[str, Any]]:
        """Frames [T, H, W, 3] uint8 and their metadata (the video's fps, its frame count, the frames' indices). An
        array passed in-process is taken as already sampled at the configured rate (`fps`, 2 by default)."""
        if isinstance(source, np.ndarray):
            if source.ndim != 4 or source.shape[-1] != 3 or len(source) == 0:
                raise MediaError(f"{label}: frames must be an array [frames, height, width, 3]")
            return source, video_metadata(float(self.video["fps"]), len(source), range(len(source)))
        if isinstance(source, dict):
            source = source.get("url")
        frames, fps = load_video_frames(source, self.policy, label)
        v = self.video
        index = sample_frame_indices(len(frames), fps, float(v["fps"]), int(v["min_frames"]), int(v["max_frames"]))
        return frames[index], video_metadata(fps, len(frames), index)


def video_metadata(fps: float, total_frames: int, indices: Any) -> dict[str, Any]:
    """The Hugging Face video processors' metadata for frames `indices` of a video of `total_frames` at `fps`."""
    return {"fps": fps, "total_num_frames": total_frames, "frames_indices": [int(i) for i in indices]}
