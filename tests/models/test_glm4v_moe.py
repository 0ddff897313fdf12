"""GLM-4.5V against transformers on a tiny random model (float32, CPU): text only, one image, two images of different
sizes, a video, chunked prefill smaller than an image, the prefix cache keyed by image content, chat through the
hub-style template (thinking on and off); the grouped sigmoid router and the whole MoE block (shared expert, routed
scaling) against transformers' on random inputs; both checkpoint layouts of the experts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from vl_helpers import (
    GREEDY,
    assert_same,
    check_chunked_prefill,
    check_prefix_cache_keyed_by_image,
    hf_generate,
    image_data_url,
    picture,
)

from mmserve import Engine
from mmserve.layers.linear import default_weight_loader
from mmserve.layers.moe import MoeBlock, RouterConfig, TopKRouter
from mmserve.models.glm4v_moe import Glm4vMoeForConditionalGeneration

IMAGE = "<|begin_of_image|><|image|><|end_of_image|>"
VIDEO = "<|begin_of_video|><|video|><|end_of_video|>"


@pytest.fixture(scope="module")
def hf(tiny_glm4v_moe_dir):
    from transformers import AutoProcessor, Glm4vMoeForConditionalGeneration

    model = Glm4vMoeForConditionalGeneration.from_pretrained(tiny_glm4v_moe_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(tiny_glm4v_moe_dir)


@pytest.fixture(scope="module")
def engine(tiny_glm4v_moe_dir):
    with Engine(model_path=str(tiny_glm4v_moe_dir), dtype="float32") as e:
        yield e


# 14 px patches merged 2x2: 150x100 -> 10x8 patches (20 tokens), 60x90 -> 4x6 (6), 200x56 -> 14x4 (14)
CASES = {
    "text only": ("Just some text without pictures.", []),
    "one image": (f"Describe {IMAGE} briefly.", [picture(150, 100, 0)]),
    "two images of different sizes": (f"Compare {IMAGE} with {IMAGE} now.", [picture(60, 90, 1), picture(200, 56, 2)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers(case, engine, hf):
    prompt, images = CASES[case]
    ours = engine.generate(prompt, GREEDY, return_logits=True, image_data=images or None)
    assert_same(ours, hf_generate(hf, prompt, images))


def test_video_matches_transformers(engine, hf):
    """Four frames at 2 fps: two frame pairs, each its own item after its timestamp."""
    frames = np.random.RandomState(9).randint(0, 255, (4, 60, 80, 3), dtype=np.uint8)
    prompt = f"Watch {VIDEO} and tell."
    encoder = engine.runner.model.encoder_cache
    stores = encoder.stores
    ours = engine.generate(prompt, GREEDY, return_logits=True, video_data=[frames])
    assert encoder.stores - stores == 2
    assert_same(ours, hf_generate(hf, prompt, [], [frames]))


def test_chunked_prefill_smaller_than_an_image(tiny_glm4v_moe_dir, hf):
    prompt, images = CASES["two images of different sizes"]
    check_chunked_prefill(tiny_glm4v_moe_dir, hf, prompt, images)


def test_prefix_cache_reuses_a_repeated_image(engine):
    check_prefix_cache_keyed_by_image(engine, IMAGE)


@pytest.mark.parametrize("thinking", [None, False])
def test_chat_with_the_hub_template(thinking, engine, hf):
    """OpenAI image parts render as transformers' processor renders its image parts (with `enable_thinking=False`:
    "/nothink" and an empty think block), and the answer is transformers'."""
    from mmserve.tokenizer.chat_template import render_chat

    images = [picture(120, 90, 7), picture(60, 80, 8)]
    _, processor = hf
    kwargs = {} if thinking is None else {"enable_thinking": thinking}

    def messages(*parts: dict) -> list[dict]:
        return [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [parts[0], {"type": "text", "text": "What is this? "}, parts[1]]}]

    prompt = processor.apply_chat_template(messages({"type": "image"}, {"type": "image"}), add_generation_prompt=True,
                                           **kwargs)
    tail = "/nothink<|assistant|>\n<think></think>" if thinking is False else "<|assistant|>"
    assert prompt == f"[gMASK]<sop><|system|>\nBe brief.<|user|>\n{IMAGE}What is this? {IMAGE}{tail}"
    chat = messages(*({"type": "image_url", "image_url": {"url": image_data_url(img)}} for img in images))
    assert render_chat(engine.tokenizer, chat, engine.chat_template, **kwargs) == prompt
    assert engine.chat(chat, GREEDY, **kwargs)["output_ids"] == hf_generate(hf, prompt, images)[0]


def test_layers_are_dense_then_experts(engine):
    layers = engine.runner.model.model.layers
    assert not isinstance(layers[0].mlp, MoeBlock)
    block = layers[1].mlp
    assert isinstance(block, MoeBlock) and block.shared_experts is not None
    assert block.gate.config == RouterConfig(8, 2, "sigmoid", norm_topk_prob=True, score_correction_bias=True,
                                             n_group=2, topk_group=1, routed_scaling_factor=2.5)


def hf_moe_config(**router):
    from transformers import Glm4vMoeTextConfig

    return Glm4vMoeTextConfig(hidden_size=32, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=3,
                              n_shared_experts=1, **router)


@pytest.mark.parametrize("router", [dict(n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True),
                                    dict(n_group=1, topk_group=1, norm_topk_prob=False)])
def test_grouped_router_matches_transformers(router):
    """On random gates, biases and inputs, the same experts (in any order) with the same weights: with 4 groups of 2
    only experts of the 2 best groups are eligible, ranked by the biased scores and weighted by the unbiased ones."""
    from transformers.models.glm4v_moe.modeling_glm4v_moe import Glm4vMoeTextTopkRouter

    config = hf_moe_config(**router)
    torch.manual_seed(0)
    ref = Glm4vMoeTextTopkRouter(config)
    with torch.no_grad():
        ref.weight.normal_(0.0, 0.5)
        ref.e_score_correction_bias.normal_(0.0, 0.3)
    ours = TopKRouter(32, RouterConfig.deepseek_v3(config))
    x = torch.randn(64, 32)
    with torch.no_grad():
        ours.weight.copy_(ref.weight)
        ours.e_score_correction_bias.copy_(ref.e_score_correction_bias)
        _, ref_weights, ref_ids = ref(x)
        weights, ids = ours(x)
    order, ref_order = ids.argsort(-1), ref_ids.argsort(-1)
    assert torch.equal(ids.gather(1, order), ref_ids.gather(1, ref_order))
    torch.testing.assert_close(weights.gather(1, order), ref_weights.gather(1, ref_order), atol=1e-6, rtol=1e-6)
    if router["n_group"] > 1:  # the choice was constrained: the three experts lie in at most two groups
        assert max(len(set((row // 2).tolist())) for row in ids) <= 2


def hf_moe_block():
    from transformers.models.glm4v_moe.modeling_glm4v_moe import Glm4vMoeTextMoE

    config = hf_moe_config(n_group=2, topk_group=1, routed_scaling_factor=2.5, hidden_act="silu")
    torch.manual_seed(1)
    ref = Glm4vMoeTextMoE(config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.3)
        ref.gate.e_score_correction_bias.normal_(0.0, 0.3)
    return ref


def loaded_block(ref) -> MoeBlock:
    """Our block (this rank's share of it) with the reference block's weights, through the parameters' loaders."""
    block = MoeBlock(32, 16, RouterConfig.deepseek_v3(ref.config), shared_intermediate_size=16)
    params = dict(block.named_parameters())
    packed = {"shared_experts.gate_proj.weight": ("shared_experts.gate_up_proj.weight", 0),
              "shared_experts.up_proj.weight": ("shared_experts.gate_up_proj.weight", 1)}
    for name, tensor in [*ref.named_parameters(), *ref.named_buffers()]:
        target, shard = packed.get(name, (name, None))
        param = params[target]
        if shard is None:
            getattr(param, "weight_loader", default_weight_loader)(param, tensor.detach())
        else:
            param.weight_loader(param, tensor.detach(), shard)
    return block


def test_moe_block_matches_transformers():
    """Routed experts weighted in float32, scaled, plus the shared expert, as transformers' block."""
    ref = hf_moe_block()
    x = torch.randn(40, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded_block(ref)(x), ref(x[None])[0], atol=1e-5, rtol=1e-5)


def test_tensor_parallel_shards_sum_to_the_whole(monkeypatch):
    """Two simulated ranks, each with the whole router and half of every expert's and the shared expert's width:
    with the all-reduces replaced by a sum of the ranks' outputs, the result is the unsharded block's. (An engine at
    tp_size 2 over gloo costs about 10 s; GLM-4.1V's test covers the rest of this model's tensor parallelism.)"""
    import mmserve.layers.linear as linear
    import mmserve.layers.moe as moe

    ref = hf_moe_block()
    whole = loaded_block(ref)
    x = torch.randn(30, 32)
    parts = []
    for rank in range(2):
        for module in (moe, linear):
            monkeypatch.setattr(module, "get_tp_size", lambda: 2)
            monkeypatch.setattr(module, "get_tp_rank", lambda rank=rank: rank)
        shard = loaded_block(ref)
        assert shard.experts.gate_up_proj.shape == (8, 16, 32)  # half the gate rows and half the up rows
        assert shard.shared_experts.down_proj.weight.shape == (32, 8)
        parts.append(shard(x))
    with torch.no_grad():
        torch.testing.assert_close(parts[0] + parts[1], whole(x), atol=1e-5, rtol=1e-5)


def test_loads_both_expert_layouts(hf, tiny_glm4v_moe_dir):
    """transformers' in-memory layout (fused 3-D experts) and the saved one (one matrix per expert, as the hub's
    files) fill every parameter with the same values; a decoder layer past num_hidden_layers (a next-token-prediction
    layer) is skipped."""
    from safetensors.torch import load_file

    fused = dict(hf[0].state_dict())
    assert "model.language_model.layers.1.mlp.experts.gate_up_proj" in fused
    saved = load_file(str(tiny_glm4v_moe_dir / "model.safetensors"))
    assert "model.language_model.layers.1.mlp.experts.7.up_proj.weight" in saved
    saved["model.language_model.layers.2.mlp.gate.weight"] = torch.zeros(8, 64)
    models = []
    for weights in (fused, saved):
        model = Glm4vMoeForConditionalGeneration(hf[0].config)
        assert model.load_weights(weights.items()) == {name for name, _ in model.named_parameters()}
        models.append(model)
    for (name, a), (_, b) in zip(models[0].named_parameters(), models[1].named_parameters(), strict=True):
        assert torch.equal(a, b), name

