"""Videos from URLs keep their clock through the model's processor: mmserve samples the frames (Qwen's 2 fps, or
--mm-process-config) and hands the Hugging Face processor the video's fps and the picked frame indices, so Qwen2.5-VL's
M-RoPE time steps and Qwen3-VL's "<t seconds>" timestamps follow the real video, and Qwen3-VL does not sample again
(without the metadata it would assume 24 fps)."""

from __future__ import annotations

import json

import pytest
from vl_helpers import VIDEO, video_data_url

from mmserve.config import ServerArgs
from mmserve.multimodal.processor import MultimodalProcessor


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> str:
    """3 s at 10 fps: at 2 fps Qwen's sampling keeps frames 0, 6, 12, 17, 23, 29 (three frame pairs)."""
    return video_data_url(tmp_path_factory.mktemp("clip") / "clip.mp4", frames=30, fps=10)


def processor(model_dir, fps: float | None = None) -> MultimodalProcessor:
    from transformers import AutoConfig

    from mmserve.multimodal.processors import ProcessorRegistry

    config = AutoConfig.from_pretrained(model_dir)
    extra = {"mm_process_config": json.dumps({"video": {"fps": fps}})} if fps else {}
    args = ServerArgs(model_path=str(model_dir), **extra)
    return MultimodalProcessor(args, ProcessorRegistry.resolve(config.architectures), config, model_dir)


# fps -> timestamps of the frame pairs: the mean of each pair's frame times (index / 10 fps)
QWEN3_TIMESTAMPS = {
    None: ["<0.3 seconds>", "<1.4 seconds>", "<2.6 seconds>"],  # frames 0, 6 | 12, 17 | 23, 29
    1.0: ["<0.5 seconds>", "<2.4 seconds>"],  # 3 s at 1 fps, raised to the minimum of 4 frames: 0, 10 | 19, 29
}


@pytest.mark.parametrize("fps", list(QWEN3_TIMESTAMPS))
def test_qwen3_vl_timestamps_follow_the_video(tiny_qwen3_vl_dir, clip, fps):
    mm_processor = processor(tiny_qwen3_vl_dir, fps)
    ids, mm = mm_processor.process(f"Clip {VIDEO} end.", [("video", clip)])
    text = mm_processor.hf.tokenizer.decode(ids)
    stamps = [part.split(">")[0] + ">" for part in text.split("<")[1:] if "seconds>" in part]
    assert ["<" + s for s in stamps] == QWEN3_TIMESTAMPS[fps]
    assert len([it for it in mm.items if it.modality == "video"]) == len(QWEN3_TIMESTAMPS[fps])  # one per frame pair


@pytest.mark.parametrize(("fps", "step"), [(None, 2), (1.0, 3)])
def test_qwen2_5_vl_time_steps_follow_the_video(tiny_qwen2_5_vl_dir, clip, fps, step):
    """The temporal M-RoPE row advances tokens_per_second (2) x seconds per frame pair: 6 frames over 3 s are 1 s a
    pair (step 2); 4 frames over 3 s are 1.5 s a pair (step 3)."""
    ids, mm = processor(tiny_qwen2_5_vl_dir, fps).process(f"Clip {VIDEO} end.", [("video", clip)])
    video = next(it for it in mm.items if it.modality == "video")
    t, h, w = video.features["grid_thw"][0].tolist()
    per_pair = h * w // 4
    starts = mm.mrope_positions[0, video.offset:video.end:per_pair].tolist()
    assert len(starts) == t == (3 if fps is None else 2)
    assert [b - a for a, b in zip(starts[:-1], starts[1:], strict=True)] == [step] * (t - 1)
