"""Qwen2.5-VL against transformers on a tiny random model (float32, CPU): images one and two at a time, text only,
chunked prefill that cuts an image; at the model level, a video through the windowed ViT, video M-RoPE positions
with real frame timing, and the original checkpoint layout.

The tiny ViT's windows are 56 px (2x2 LLM tokens) and the images are chosen so that every image has several
windows and the grids are not multiples of the window, so edge windows are smaller."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from vl_helpers import GREEDY, IMAGE, VIDEO, assert_same, check_chunked_prefill, hf_generate, picture

from mmserve import Engine
from mmserve.models.loader import iterate_weights
from mmserve.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration, window_order
from mmserve.multimodal.processors.qwen_vl import qwen2_5_vl_inputs


@pytest.fixture(scope="module")
def hf(tiny_qwen2_5_vl_dir):
    from transformers import AutoProcessor
    from transformers import Qwen2_5_VLForConditionalGeneration as HFQwen2_5_VL

    model = HFQwen2_5_VL.from_pretrained(tiny_qwen2_5_vl_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(tiny_qwen2_5_vl_dir)


@pytest.fixture(scope="module")
def ours(tiny_qwen2_5_vl_dir, hf) -> Qwen2_5_VLForConditionalGeneration:
    """Our model on its own (no engine), to compare the vision tower and positions directly."""
    config = hf[0].config
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.load_weights(iterate_weights(tiny_qwen2_5_vl_dir, config))
    return model


@pytest.fixture(scope="module")
def engine(tiny_qwen2_5_vl_dir):
    with Engine(model_path=str(tiny_qwen2_5_vl_dir), dtype="float32") as e:
        yield e


# LLM grids (after 2x2 merging): 7x11, then 4x3 and 2x7; windows are 2x2 LLM tokens
CASES = {
    "one image": (f"Describe {IMAGE} briefly.", [picture(300, 200, 0)]),
    "two images of different sizes": (f"Compare {IMAGE} with {IMAGE} now.", [picture(90, 120, 1), picture(200, 60, 2)]),
    "text only": ("Just some text without pictures.", []),
}


def test_test_images_have_several_windows_some_partial(hf):
    """The premise of the comparisons below: window attention really cuts these images."""
    model, processor = hf
    vc = model.config.vision_config
    window = vc.window_size // vc.spatial_merge_size // vc.patch_size
    full = window * window * vc.spatial_merge_size**2
    for case in ("one image", "two images of different sizes"):
        prompt, images = CASES[case]
        grids = processor(text=[prompt], images=images, return_tensors="pt")["image_grid_thw"]
        for grid in grids:
            _, lengths = window_order([tuple(grid.tolist())], vc.spatial_merge_size, window)
            assert len(lengths) >= 4 and min(lengths) < full, (case, grid.tolist(), lengths)
            assert sum(lengths) == int(grid.prod())


@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers(case, engine, hf):
    prompt, images = CASES[case]
    ours = engine.generate(prompt, GREEDY, return_logits=True, image_data=images if images else None)
    assert_same(ours, hf_generate(hf, prompt, images))


def test_chunked_prefill_smaller_than_an_image(tiny_qwen2_5_vl_dir, hf):
    prompt, images = CASES["two images of different sizes"]
    check_chunked_prefill(tiny_qwen2_5_vl_dir, hf, prompt, images)


def video_inputs(hf) -> dict:
    """A 4-frame-pair video (LLM grid 4x5x7) and an image in one prompt, through the HF processor."""
    _, processor = hf
    frames = np.random.RandomState(3).randint(0, 255, (8, 150, 200, 3), dtype=np.uint8)
    enc = processor(text=[f"A clip {VIDEO} and a still {IMAGE} to compare."], videos=[frames],
                    images=[picture(90, 120, 4)], return_tensors="pt")
    assert enc["video_grid_thw"].tolist() == [[4, 10, 14]]
    return enc


def test_video_through_the_vision_tower(ours, hf):
    """Several frame pairs: windows and full attention stay within each frame pair."""
    enc = video_inputs(hf)
    with torch.no_grad():
        ref = hf[0].model.visual(enc["pixel_values_videos"], grid_thw=enc["video_grid_thw"]).pooler_output
        got = ours.visual(enc["pixel_values_videos"], enc["video_grid_thw"])
    assert (got - ref).abs().max().item() < 1e-4


def reference_rope_index(hf, enc: dict, seconds: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    return hf[0].model.get_rope_index(
        enc["input_ids"], mm_token_type_ids=enc["mm_token_type_ids"], image_grid_thw=enc["image_grid_thw"],
        video_grid_thw=enc["video_grid_thw"], second_per_grid_ts=seconds)


@pytest.mark.parametrize("seconds", [None, 1.3])
def test_video_mrope_positions_use_frame_timing(ours, hf, seconds):
    enc = video_inputs(hf)
    if seconds is None:
        del enc["second_per_grid_ts"]  # the reference then takes one second per frame pair
    else:
        enc["second_per_grid_ts"] = torch.tensor([seconds])  # as if sampled at 2 / 1.3 fps
    mm = qwen2_5_vl_inputs(hf[0].config, enc)
    positions, deltas = reference_rope_index(hf, enc, enc.get("second_per_grid_ts"))
    expected = positions[:, 0].clone()
    video = next(it for it in mm.items if it.modality == "video")
    if seconds is not None and torch.equal(positions, reference_rope_index(hf, enc, torch.tensor([1.0]))[0]):
        # transformers before huggingface/transformers#48669 (5.17 among them) cut the seconds to whole ones before
        # scaling, so 1.3 s counted as 1 s; we keep the fraction, as the fix does. Only the video's temporal row
        # differs: frame pair i sits at start + int(i * 1.3 * tokens_per_second).
        rows = slice(video.offset, video.end)
        steps = (torch.arange(4) * seconds * hf[0].config.vision_config.tokens_per_second).long()
        expected[0, rows] = expected[0, video.offset] + steps.repeat_interleave(video.length // 4)
    assert torch.equal(mm.mrope_positions, expected)
    assert mm.mrope_delta == int(deltas[0, 0])
    # the video's temporal row really advances by more than one position per frame pair
    starts = mm.mrope_positions[0, video.offset:video.end:35].tolist()
    assert len(starts) == 4 and all(b - a >= 2 for a, b in zip(starts[:-1], starts[1:], strict=True))


def test_original_checkpoint_layout(tiny_qwen2_5_vl_dir, ours, hf):
    """Checkpoints saved before transformers 5 name the tower "visual." and the LLM "model."."""
    def original(name: str) -> str:
        if name.startswith("model.visual."):
            return name.removeprefix("model.")
        if name.startswith("model.language_model."):
            return "model." + name.removeprefix("model.language_model.")
        return name

    model = Qwen2_5_VLForConditionalGeneration(hf[0].config).eval()
    loaded = model.load_weights((original(n), t) for n, t in iterate_weights(tiny_qwen2_5_vl_dir, hf[0].config))
    assert loaded == {n for n, _ in model.named_parameters()}
    expected = ours.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_video_and_image_through_the_engine_match_transformers(engine, hf):
    """Video time steps come from the processor's second_per_grid_ts, through the whole engine: frames given as an
    array count as sampled at 2 fps, one second per frame pair, which M-RoPE spaces tokens_per_second (2) apart."""
    frames = np.random.RandomState(9).randint(0, 255, (8, 60, 80, 3), dtype=np.uint8)
    prompt = f"Watch <|vision_start|><|video_pad|><|vision_end|> and {IMAGE}."
    image = picture(70, 50, 10)
    ours_out = engine.generate(prompt, GREEDY, return_logits=True, image_data=[image], video_data=[frames])
    assert_same(ours_out, hf_generate(hf, prompt, [image], [frames]))
