"""Qwen3-VL-MoE against transformers on a tiny random model (float32, CPU): the Qwen3-VL vision side with experts in
every decoder layer. Images one and two at a time, text only, a video, chunked prefill that cuts an image, and the
expert tensors in both checkpoint layouts (transformers' [E, 2I, H] / [E, H, I] and the original files' transposes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from vl_helpers import GREEDY, IMAGE, VIDEO, assert_same, check_chunked_prefill, hf_generate, picture

from mmserve import Engine
from mmserve.layers.moe import SparseMoeBlock
from mmserve.models.qwen3_vl import Qwen3VLMoeForConditionalGeneration


@pytest.fixture(scope="module")
def hf(tiny_qwen3_vl_moe_dir):
    from transformers import AutoProcessor
    from transformers import Qwen3VLMoeForConditionalGeneration as HFQwen3VLMoe

    model = HFQwen3VLMoe.from_pretrained(tiny_qwen3_vl_moe_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(tiny_qwen3_vl_moe_dir)


@pytest.fixture(scope="module")
def engine(tiny_qwen3_vl_moe_dir):
    with Engine(model_path=str(tiny_qwen3_vl_moe_dir), dtype="float32") as e:
        yield e


CASES = {
    "one image": (f"Describe {IMAGE} briefly.", [picture(150, 100, 0)]),
    "two images of different sizes": (f"Compare {IMAGE} with {IMAGE} now.", [picture(90, 120, 1), picture(200, 60, 2)]),
    "text only": ("Just some text without pictures, long enough that many experts get tokens.", []),
}


def test_every_decoder_layer_has_experts(engine):
    layers = engine.runner.model.model.layers
    assert all(isinstance(layer.mlp, SparseMoeBlock) for layer in layers)
    assert all(layer.mlp.norm_topk_prob for layer in layers)  # the VL-MoE router always renormalises


@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers(case, engine, hf):
    prompt, images = CASES[case]
    ours = engine.generate(prompt, GREEDY, return_logits=True, image_data=images if images else None)
    assert_same(ours, hf_generate(hf, prompt, images))


def test_batched_requests_match_transformers(engine, hf):
    """Several requests in one batch: the experts see rows of different requests mixed together."""
    prompts = [CASES["one image"][0], CASES["text only"][0]]
    outs = engine.generate(prompts, GREEDY, return_logits=True, image_data=[CASES["one image"][1], None])
    assert_same(outs[0], hf_generate(hf, prompts[0], CASES["one image"][1]))
    assert_same(outs[1], hf_generate(hf, prompts[1], []))
    with pytest.raises(ValueError, match="image_data for 2 prompts must be a list of 2 entries"):
        engine.generate(prompts, GREEDY, image_data=[CASES["one image"][1][0]])


def test_video_matches_transformers(engine, hf):
    frames = np.random.RandomState(9).randint(0, 255, (8, 60, 80, 3), dtype=np.uint8)
    prompt = f"Watch {VIDEO} and then {IMAGE} too."
    image = picture(70, 50, 10)
    ours = engine.generate(prompt, GREEDY, return_logits=True, image_data=[image], video_data=[frames])
    assert_same(ours, hf_generate(hf, prompt, [image], [frames]))


def test_chunked_prefill_smaller_than_an_image(tiny_qwen3_vl_moe_dir, hf):
    prompt, images = CASES["two images of different sizes"]
    check_chunked_prefill(tiny_qwen3_vl_moe_dir, hf, prompt, images)


def test_loads_both_expert_layouts(hf):
    """The fused expert tensors as transformers keeps them and transposed (the original Qwen3-VL-MoE files), with
    the original top-level names, fill every parameter with the same values."""
    state = hf[0].state_dict()
    original = {}
    for name, tensor in state.items():
        name = name.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        original[name] = tensor.transpose(1, 2) if name.endswith(("experts.gate_up_proj", "experts.down_proj")) \
            else tensor
    assert original["model.layers.0.mlp.experts.gate_up_proj"].shape == (8, 64, 96)
    models = []
    for weights in (state, original):
        model = Qwen3VLMoeForConditionalGeneration(hf[0].config)
        assert model.load_weights(weights.items()) == {name for name, _ in model.named_parameters()}
        models.append(model)
    for (name, a), (_, b) in zip(models[0].named_parameters(), models[1].named_parameters(), strict=True):
        assert torch.equal(a, b), name
    gate_up = models[0].model.layers[1].mlp.experts.gate_up_proj
    assert torch.equal(gate_up, state["model.language_model.layers.1.mlp.experts.gate_up_proj"])
