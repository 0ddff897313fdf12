"""GLM-4.1V: the HF processor's output cut into one item per image and one per video frame, with the prompt's M-RoPE
positions.

GLM-4.1V writes every image and every video frame as `<|begin_of_image|>` + image tokens + `<|end_of_image|>`, a
video's frames each followed by its timestamp and all of them between `<|begin_of_video|>` and `<|end_of_video|>`.
A video's frames are therefore image-token runs of their own: the runs inside a video's bounds are its frames, and
otherwise the cutting and the positions are Qwen3-VL's (one item per frame, one position step per frame).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PretrainedConfig

from mmserve.multimodal.inputs import MultimodalInputs
from mmserve.multimodal.processors import ProcessorSpec
from mmserve.multimodal.processors.qwen_vl import qwen3_vl_inputs


def glm4v_inputs(hf_config: PretrainedConfig, processed: dict[str, Any]) -> MultimodalInputs:
    """Image tokens inside a video's bounds are relabelled as video tokens (for the cutting only: the prompt's ids
    stay as the processor made them), then cut as Qwen3-VL's."""
    ids = processed["input_ids"][0]
    starts = (ids == hf_config.video_start_token_id).cumsum(0)
    ends = (ids == hf_config.video_end_token_id).cumsum(0)
    in_video = (starts > ends) & (ids == hf_config.image_token_id)
    labelled = torch.where(in_video, torch.full_like(ids, hf_config.video_token_id), ids)
    return qwen3_vl_inputs(hf_config, {**processed, "input_ids": labelled[None]})


PROCESSORS = {
    "Glm4vForConditionalGeneration": ProcessorSpec(glm4v_inputs),
    "Glm4vMoeForConditionalGeneration": ProcessorSpec(glm4v_inputs),  # GLM-4.5V: the same processor
}
