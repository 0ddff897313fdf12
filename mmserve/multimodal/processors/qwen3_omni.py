"""Qwen3-Omni thinker: the HF processor's output cut into one item per image, video and audio clip, with the prompt's
M-RoPE positions.

Images and videos are Qwen3-VL's (`qwen_vl.cut_items`), except that a video is one placeholder run (the Omni
processor writes no timestamps between frames) whose frame pairs are `video_second_per_grid` seconds apart, at
`position_id_per_seconds` positions a second, and the text after a video resumes past its last time step (Qwen3-VL's
resumes past the grid's side). An audio clip is one run of its placeholder; its positions run on like
text. Its features are the clip's log-mel frames [mel, frames] (`input_features` cut to the clip's
`feature_attention_mask`), which the model's audio encoder turns into `audio_tokens(frames)` rows.

A video with its own sound (`mm_processor_kwargs` `use_audio_in_video`, off by default as in transformers and vLLM):
the frames and the sound track go through the processor apart (`video_with_audio` joins them), and the placeholder
becomes `<|audio_start|>`, the video's and the sound's tokens merged by time, `<|audio_end|>`, inside the prompt's
`<|vision_start|>`...`<|vision_end|>` (get_rope_index finds it there, so the `<|vision_start|>` is required). A frame
pair at time step k * `video_second_per_grid` * `position_id_per_seconds` goes before the sound tokens from that step
on (sound token j is at step j), so each frame pair stays one run. The step is the config's, for the layout as for
the positions (transformers' processor lays out with its own 13 a second, which the released configs also say).
Such a video is one item over the merged tokens: its patches, its sound's log-mel frames, and which rows are sound
(`audio_rows`); its positions are those of the frames and of the sound (running on from the block's start, like an
audio clip's) in the merged order, and the text after it resumes past the largest position of its last run of one
kind, as transformers' get_rope_index does. Every video of such a request must carry sound.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import PretrainedConfig

from mmserve.multimodal.inputs import MultimodalInputs, MultimodalItem
from mmserve.multimodal.mrope import mrope_positions
from mmserve.multimodal.processor_cache import ProcessedMedia
from mmserve.multimodal.processors import ProcessorSpec
from mmserve.multimodal.processors.qwen_vl import cut_items, image_grid, runs


def audio_tokens(frames: int, n_window: int) -> int:
    """Encoder rows of a clip of `frames` mel frames: it is cut into chunks of 2 * n_window frames, and each chunk
    goes through three stride-2 convolutions (a full chunk of 100 frames gives 13)."""
    def convs(length: int) -> int:
        for _ in range(3):
            length = (length - 1) // 2 + 1
        return length

    full, tail = divmod(frames, 2 * n_window)
    return full * convs(2 * n_window) + (convs(tail) if tail else 0)


def interleave(grid: tuple[int, int, int], step: float, sound_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A video's LLM grid (t, h, w) and its sound's tokens merged by time: (which of the merged tokens are sound
    [n] bool, their positions from 0 [3, n]). Frame pair k is at time k * step, sound token j at time j; a frame
    pair goes first on a tie."""
    t, h, w = grid
    times = np.concatenate([np.repeat(np.arange(t) * step, h * w), np.arange(sound_tokens, dtype=np.float64)])
    is_sound = np.concatenate([np.zeros(t * h * w, dtype=bool), np.ones(sound_tokens, dtype=bool)])
    order = torch.from_numpy(np.lexsort((is_sound, times)))  # by time, frames before sound: a stable merge
    frames, _ = mrope_positions(t * h * w, [MultimodalItem("video", {}, 0, t * h * w)], [grid], [step])
    positions = torch.cat([frames, torch.arange(sound_tokens).expand(3, -1)], dim=1)
    return torch.from_numpy(is_sound)[order], positions[:, order]


def _resume(positions: torch.Tensor, is_sound: torch.Tensor) -> int:
    """Where the text after a merged video resumes: past the largest position of its last run of one kind."""
    kinds = is_sound.tolist()
    start = len(kinds)
    while start > 0 and kinds[start - 1] == kinds[-1]:
        start -= 1
    return int(positions[:, start:].max()) + 1


def _step(hf_config: PretrainedConfig, seconds_per_grid: float) -> float:
    return seconds_per_grid * float(hf_config.position_id_per_seconds)


def video_with_audio(hf_processor: Any, hf_config: PretrainedConfig, video: ProcessedMedia,
                     sound: ProcessedMedia) -> ProcessedMedia:
    """A video's processor output and its sound track's joined (each processed alone): the merged placeholder
    between `<|audio_start|>` and `<|audio_end|>`, the video's features, and the sound's log-mel frames as
    `video_audio_features` [1, mel, frames] (apart from the audio clips' `input_features`)."""
    t, h, w = video.features["video_grid_thw"][0].tolist()
    merge = hf_config.vision_config.spatial_merge_size
    step = _step(hf_config, float(video.features["video_second_per_grid"][0]))
    is_sound, _ = interleave((t, h // merge, w // merge), step, len(sound.token_ids))
    tokenizer = hf_processor.tokenizer
    merged = torch.where(is_sound, hf_config.audio_token_id, hf_config.video_token_id).tolist()
    ids = (tokenizer.convert_tokens_to_ids(hf_processor.audio_bos_token), *merged,
           tokenizer.convert_tokens_to_ids(hf_processor.audio_eos_token))
    mel = sound.features["input_features"][0][:, sound.features["feature_attention_mask"][0].bool()]
    return ProcessedMedia({**video.features, "video_audio_features": mel[None]}, ids)


def _each(value: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
    return list(value) if isinstance(value, list) else list(value.unbind(0))


def _videos_with_audio(hf_config: PretrainedConfig, processed: dict[str, Any]) -> list[MultimodalItem]:
    """One item per video with its sound: the merged run after each `<|vision_start|><|audio_start|>`."""
    ids = processed["input_ids"][0]
    grids, sounds = processed["video_grid_thw"], _each(processed["video_audio_features"])
    seconds, merge = processed["video_second_per_grid"], hf_config.vision_config.spatial_merge_size
    media = (hf_config.video_token_id, hf_config.audio_token_id)
    starts = [i + 1 for i in ((ids[1:] == hf_config.audio_start_token_id)
                              & (ids[:-1] == hf_config.vision_start_token_id)).nonzero().flatten().tolist()]
    if len(starts) != len(grids):
        raise ValueError(f"with use_audio_in_video every video placeholder must follow <|vision_start|>, as the chat "
                         f"template writes it: {len(starts)} of {len(grids)} videos do")
    items = []
    patches = processed["pixel_values_videos"].split(grids.prod(-1).tolist())
    for index, (start, grid, sound, pixels) in enumerate(zip(starts, grids, sounds, patches, strict=True)):
        start += 1
        end = start
        while end < len(ids) and int(ids[end]) in media:
            end += 1
        t, h, w = grid.tolist()
        mel = sound.reshape(-1, sound.shape[-1])
        is_sound, _ = interleave((t, h // merge, w // merge), _step(hf_config, float(seconds[index])),
                                 audio_tokens(mel.shape[1], hf_config.audio_config.n_window))
        if not torch.equal(ids[start:end] == hf_config.audio_token_id, is_sound):
            raise ValueError(f"video {index}: its tokens are not its frames and sound merged by time")
        items.append(MultimodalItem("video", {"pixel_values": pixels, "grid_thw": grid[None], "audio_features": mel,
                                              "audio_rows": is_sound}, start, end - start))
    return items


def _audio_items(hf_config: PretrainedConfig, processed: dict[str, Any], ids: torch.Tensor) -> list[MultimodalItem]:
    features, masks = processed.get("input_features"), processed.get("feature_attention_mask")
    if features is None:
        return []
    features, masks = _each(features), _each(masks)
    found = runs(ids, hf_config.audio_token_id)
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

    def interval(modality: str, index: int) -> float:
        # images have one frame pair: their step never shows
        return _step(hf_config, float(seconds[index]) if modality == "video" and seconds is not None else 1.0)

    ids = processed["input_ids"][0]
    merged: list[MultimodalItem] = []
    if processed.get("video_audio_features") is not None:  # the videos carry their sound: cut here, not as runs
        merged = _videos_with_audio(hf_config, processed)
        processed = {k: v for k, v in processed.items() if k not in ("pixel_values_videos", "video_grid_thw")}
        ids = ids.clone()
        for item in merged:
            ids[item.offset:item.end] = -1  # their sound tokens are no audio clip's
    vision = cut_items(hf_config, processed, interval)
    items = sorted(vision.items + merged + _audio_items(hf_config, processed, ids), key=lambda it: it.offset)
    merge = hf_config.vision_config.spatial_merge_size
    grids, intervals, videos = [], [], 0
    for item in items:
        if item.modality == "audio" or "audio_rows" in item.features:  # a video with sound: placed below
            grids.append(None)
            intervals.append(1.0)
        else:
            t, h, w = item.features["grid_thw"][0].tolist()
            grids.append((t, h // merge, w // merge))
            intervals.append(interval(item.modality, videos))
        videos += item.modality == "video"
    positions, _ = mrope_positions(len(ids), items, grids, intervals, resume_past_max=True)
    # A video with sound ran on like text above: its own positions go in, and what follows moves to its resume point
    videos = 0
    for item in items:
        if "audio_rows" in item.features:
            t, h, w = item.features["grid_thw"][0].tolist()
            is_sound, block = interleave((t, h // merge, w // merge), interval("video", videos),
                                         int(item.features["audio_rows"].sum()))
            start = positions[0, item.offset]
            positions[:, item.offset:item.end] = block + start
            positions[:, item.end:] += _resume(block, is_sound) - item.length
        videos += item.modality == "video"
    return MultimodalInputs(items=items, mrope_positions=positions,
                            mrope_delta=int(positions.max()) + 1 - positions.shape[1])


# the image processor is Qwen2-VL's: images can be planned here and prepared in the engine like Qwen-VL's
PROCESSORS = {"Qwen3OmniMoeThinkerForConditionalGeneration": ProcessorSpec(qwen3_omni_inputs, image_grid=image_grid,
                                                                           video_with_audio=video_with_audio)}
