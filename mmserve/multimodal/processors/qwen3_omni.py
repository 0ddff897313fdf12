"""Qwen3-Omni thinker: the HF processor's output cut into one item per image, video and audio clip, with the prompt's
M-RoPE positions.

Images and videos are Qwen3-VL's (`qwen_vl.cut_items`), except that a video is one placeholder run (the Omni
processor writes no timestamps between frames) whose frame pairs are `video_second_per_grid` seconds apart, at
`position_id_per_seconds` positions a second, and the text after a video resumes past its last time step (Qwen3-VL's
resumes past the grid's side). An audio clip is one run of its placeholder; its positions run on like
text. Its features are the clip's log-mel frames [mel, frames] (`input_features` cut to the clip's
`feature_attention_mask`), which the model's audio encoder turns into `audio_tokens(frames)` rows.

`use_audio_in_video` (a video's own sound interleaved with its frames by time) is not supported: the processor is
always called on a video's frames alone, so it never happens, and a client cannot ask for it.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from mmserve.multimodal.inputs import MultimodalInputs, MultimodalItem
from mmserve.multimodal.mrope import mrope_positions
from mmserve.multimodal.processors import ProcessorSpec
from mmserve.multimodal.processors.qwen_vl import cut_items, runs


def audio_tokens(frames: int, n_window: int) -> int:
    """Encoder rows of a clip of `frames` mel frames: it is cut into chunks of 2 * n_window frames, and each chunk
    goes through three stride-2 convolutions (a full chunk of 100 frames gives 13)."""
    def convs(length: int) -> int:
        for _ in range(3):
            length = (length - 1) // 2 + 1
        return length

    full, tail = divmod(frames, 2 * n_window)
    return full * convs(2 * n_window) + (convs(tail) if tail else 0)


def _audio_items(hf_config: PretrainedConfig, processed: dict[str, Any]) -> list[MultimodalItem]:
    features, masks = processed.get("input_features"), processed.get("feature_attention_mask")
    if features is None:
        return []
    features = list(features) if isinstance(features, list) else list(features.unbind(0))
    masks = list(masks) if isinstance(masks, list) else list(masks.unbind(0))
    found = runs(processed["input_ids"][0], hf_config.audio_token_id)
    if len(found) != len(features):
        raise ValueError(f"the prompt has {len(found)} audio placeholders for {len(features)} audio clips")
    items = []
    for (start, length), clip, mask in zip(found, features, masks, strict=True):
        clip, mask = clip.reshape(-1, clip.shape[-1]), mask.reshape(-1)
        frames = int(mask.sum())
        expected = audio_tokens(frames, hf_config.audio_config.n_window)
        if expected != length:
            raise ValueError(f"an audio clip of {frames} frames has {length} placeholder tokens, not {expected}")
        items.append(MultimodalItem("audio", {"input_features": clip[:, mask.bool()]}, start, length))
    return items


def qwen3_omni_inputs(hf_config: PretrainedConfig, processed: dict[str, Any]) -> MultimodalInputs:
    seconds = processed.get("video_second_per_grid")
    per_second = float(hf_config.position_id_per_seconds)

    def interval(modality: str, index: int) -> float:
        # images have one frame pair: their step never shows
        return float(seconds[index]) * per_second if modality == "video" and seconds is not None else per_second

    vision = cut_items(hf_config, processed, interval)
    merge = hf_config.vision_config.spatial_merge_size
    items = sorted(vision.items + _audio_items(hf_config, processed), key=lambda it: it.offset)
    grids, intervals, videos = [], [], 0
    for item in items:
        if item.modality == "audio":
            grids.append(None)
            intervals.append(1.0)
            continue
        t, h, w = item.features["grid_thw"][0].tolist()
        grids.append((t, h // merge, w // merge))
        intervals.append(interval(item.modality, videos))
        videos += item.modality == "video"
    positions, delta = mrope_positions(processed["input_ids"].shape[1], items, grids, intervals,
                                       resume_past_max=True)
    return MultimodalInputs(items=items, mrope_positions=positions, mrope_delta=delta)


PROCESSORS = {"Qwen3OmniMoeThinkerForConditionalGeneration": ProcessorSpec(qwen3_omni_inputs)}
