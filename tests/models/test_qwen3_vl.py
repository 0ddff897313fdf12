"""Qwen3-VL, dense and MoE, against transformers on tiny random models (float32, CPU): images one and two at a time,
text only, several requests in one batch, chunked prefill that cuts an image (so DeepStack rows are sliced across
chunks), a video (one item per frame between timestamps), the prefix cache keyed by image content, the interleaved
M-RoPE layout, and both checkpoint layouts (weight names, and for MoE the fused expert tensors transposed as the
original files store them). The MoE variant has experts in every decoder layer."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from vl_helpers import GREEDY, IMAGE, VIDEO, assert_same, check_chunked_prefill, hf_generate, picture, video_data_url

from mmserve import Engine
from mmserve.layers.mlp import GatedMLP
from mmserve.layers.moe import SparseMoeBlock
from mmserve.models.qwen3_vl import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration

# variant -> (fixture building the tiny checkpoint, transformers class name, our class)
VARIANTS = {
    "dense": ("tiny_qwen3_vl_dir", "Qwen3VLForConditionalGeneration", Qwen3VLForConditionalGeneration),
    "moe": ("tiny_qwen3_vl_moe_dir", "Qwen3VLMoeForConditionalGeneration", Qwen3VLMoeForConditionalGeneration),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def model_dir(request, variant):
    return request.getfixturevalue(VARIANTS[variant][0])


@pytest.fixture(scope="module")
def hf(model_dir, variant):
    import transformers
    from transformers import AutoProcessor

    model_cls = getattr(transformers, VARIANTS[variant][1])
    model = model_cls.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def engine(model_dir):
    with Engine(model_path=str(model_dir), dtype="float32") as e:
        yield e


# 16 px patches merged 2x2: 150x100 -> 10x6 patches, 90x120 -> 6x8, 200x60 -> 12x4, against an 8x8 position table
CASES = {
    "one image": (f"Describe {IMAGE} briefly.", [picture(150, 100, 0)]),
    "two images of different sizes": (f"Compare {IMAGE} with {IMAGE} now.", [picture(90, 120, 1), picture(200, 60, 2)]),
    "text only": ("Just some text without pictures, long enough that many experts get tokens.", []),
}


def test_decoder_mlps(engine, variant):
    mlps = [layer.mlp for layer in engine.runner.model.model.layers]
    if variant == "dense":
        assert all(isinstance(mlp, GatedMLP) for mlp in mlps)
    else:  # experts in every layer, and the VL-MoE router always renormalises the top-k weights
        assert all(isinstance(mlp, SparseMoeBlock) and mlp.norm_topk_prob for mlp in mlps)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers(case, engine, hf):
    prompt, images = CASES[case]
    ours = engine.generate(prompt, GREEDY, return_logits=True, image_data=images if images else None)
    assert_same(ours, hf_generate(hf, prompt, images))


def test_batched_requests_match_transformers(engine, hf):
    """An image prompt and a text prompt in one batch (their rows mixed in every layer), each image list given
    per prompt."""
    prompts = [CASES["one image"][0], CASES["text only"][0]]
    outs = engine.generate(prompts, GREEDY, return_logits=True, image_data=[CASES["one image"][1], None])
    assert_same(outs[0], hf_generate(hf, prompts[0], CASES["one image"][1]))
    assert_same(outs[1], hf_generate(hf, prompts[1], []))
    with pytest.raises(ValueError, match="image_data for 2 prompts must be a list of 2 entries"):
        engine.generate(prompts, GREEDY, image_data=[CASES["one image"][1][0]])


def test_chunked_prefill_smaller_than_an_image(model_dir, hf):
    prompt, images = CASES["two images of different sizes"]
    check_chunked_prefill(model_dir, hf, prompt, images)


def test_video_matches_transformers(engine, hf):
    frames = np.random.RandomState(9).randint(0, 255, (8, 60, 80, 3), dtype=np.uint8)
    prompt = f"Watch {VIDEO} and then {IMAGE} too."
    image = picture(70, 50, 10)
    ours = engine.generate(prompt, GREEDY, return_logits=True, image_data=[image], video_data=[frames])
    assert_same(ours, hf_generate(hf, prompt, [image], [frames]))


def test_video_url_matches_transformers_with_its_timing(engine, hf, tmp_path):
    """A 3 s, 10 fps clip by URL: the engine samples frames 0, 6, 12, 17, 23, 29 and the prompt's timestamps come from
    those indices at 10 fps, as transformers makes them from the same frames and metadata."""
    from mmserve.multimodal.media import MediaPolicy, load_video_frames
    from mmserve.multimodal.processor import sample_frame_indices

    url = video_data_url(tmp_path / "clip.mp4", frames=30, fps=10)
    prompt = f"Watch {VIDEO} now."
    ours = engine.generate(prompt, GREEDY, return_logits=True, video_data=[url])
    frames, fps = load_video_frames(url, MediaPolicy())
    index = sample_frame_indices(len(frames), fps, 2.0, 4, 768)
    assert index.tolist() == [0, 6, 12, 17, 23, 29]
    metadata = {"fps": fps, "total_num_frames": len(frames), "frames_indices": index.tolist()}
    assert_same(ours, hf_generate(hf, prompt, [], [frames[index]], [metadata]))


def test_prefix_cache_is_keyed_by_image_content(engine):
    img, other = picture(150, 100, 5), picture(150, 100, 6)
    prompt = f"Look: {IMAGE} and tell me."
    first = engine.generate(prompt, GREEDY, image_data=[img])
    again = engine.generate(prompt, GREEDY, image_data=[img])
    changed = engine.generate(prompt, GREEDY, image_data=[other])
    assert again["meta_info"]["cached_tokens"] == again["meta_info"]["prompt_tokens"] - 1
    assert again["output_ids"] == first["output_ids"]
    assert changed["meta_info"]["cached_tokens"] <= prompt.index(IMAGE)
    with Engine(model_path=engine.args.model_path, dtype="float32", disable_radix_cache=True) as plain:
        assert plain.generate(prompt, GREEDY, image_data=[other])["output_ids"] == changed["output_ids"]


def test_interleaved_mrope_matches_transformers(tiny_qwen3_vl_dir):
    """Our band layout against the reference's rotary on positions whose three rows all differ."""
    from transformers import AutoConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    from mmserve.layers.rotary import MRotaryEmbedding

    text = copy.deepcopy(AutoConfig.from_pretrained(tiny_qwen3_vl_dir).text_config)
    for section in ([4, 2, 2], [2, 3, 3]):  # the second gives row 2 fewer bands than its section says
        text.rope_parameters["mrope_section"] = section
        ref = Qwen3VLTextRotaryEmbedding(text)
        ours = MRotaryEmbedding(16, 64, {"rope_type": "default", "rope_theta": 10000.0}, section, interleaved=True)
        positions = torch.stack([torch.arange(10), torch.arange(10) * 3 % 7, torch.arange(10) * 5 % 11])
        cos, sin = ref(torch.zeros(1, dtype=torch.float32), positions[:, None])
        q = torch.randn(10, 1, 16)
        expected = q * cos[0, :, None] + torch.cat((-q[..., 8:], q[..., :8]), -1) * sin[0, :, None]
        torch.testing.assert_close(ours(positions, q, q)[0], expected)


def test_loads_both_checkpoint_layouts(hf, variant):
    """transformers 5's layout ("model.visual.", "model.language_model.", experts [E, 2I, H] and [E, H, I]) and the
    original files' ("visual.", "model.", experts transposed) fill every parameter with the same values."""
    state = hf[0].state_dict()
    original = {}
    for name, tensor in state.items():
        name = name.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        expert = name.endswith(("experts.gate_up_proj", "experts.down_proj"))
        original[name] = tensor.transpose(1, 2) if expert else tensor
    if variant == "moe":
        assert original["model.layers.0.mlp.experts.gate_up_proj"].shape == (8, 64, 96)
    models = []
    for weights in (state, original):
        model = VARIANTS[variant][2](hf[0].config)
        assert model.load_weights(weights.items()) == {name for name, _ in model.named_parameters()}
        models.append(model)
    for (name, a), (_, b) in zip(models[0].named_parameters(), models[1].named_parameters(), strict=True):
        assert torch.equal(a, b), name
