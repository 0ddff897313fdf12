"""GLM-4.1V against transformers on a tiny random model (float32, CPU): text only, one image, two images of different
sizes (larger and smaller than the learned position table), a video (one item per frame between timestamps, in a
prompt of its own: transformers fails on an image and a video in one GLM-4V prompt), chunked prefill smaller than an
image, the prefix cache keyed by image content, chat through the hub-style template, the rotate-half reordering of
the interleaved partial rotary, both checkpoint layouts, the tower through the vision graph runner's padded buffers,
and an image with a video in one prompt against transformers' parts (tower, M-RoPE positions, language model)."""

from __future__ import annotations

import re

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
    sampled_at,
    video_data_url,
)

from mmserve import Engine
from mmserve.models.glm4v import Glm4vForConditionalGeneration, half_rotary_layout

IMAGE = "<|begin_of_image|><|image|><|end_of_image|>"
VIDEO = "<|begin_of_video|><|video|><|end_of_video|>"


@pytest.fixture(scope="module")
def hf(tiny_glm4v_dir):
    from transformers import AutoProcessor, Glm4vForConditionalGeneration

    model = Glm4vForConditionalGeneration.from_pretrained(tiny_glm4v_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(tiny_glm4v_dir)


@pytest.fixture(scope="module")
def engine(tiny_glm4v_dir):
    with Engine(model_path=str(tiny_glm4v_dir), dtype="float32") as e:
        yield e


# 14 px patches merged 2x2 against a 4x4 position table: 150x100 -> 10x8 patches, 60x90 -> 4x6, 200x56 -> 14x4
CASES = {
    "one image": (f"Describe {IMAGE} briefly.", [picture(150, 100, 0)]),
    "two images of different sizes": (f"Compare {IMAGE} with {IMAGE} now.", [picture(60, 90, 1), picture(200, 56, 2)]),
    "text only": ("Just some text without pictures.", []),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers(case, engine, hf):
    prompt, images = CASES[case]
    ours = engine.generate(prompt, GREEDY, return_logits=True, image_data=images if images else None)
    assert_same(ours, hf_generate(hf, prompt, images))


def test_video_matches_transformers(engine, hf):
    """Six frames at 2 fps: three frame pairs, each its own item after its timestamp (0, 1 and 2 s)."""
    frames = np.random.RandomState(9).randint(0, 255, (6, 60, 80, 3), dtype=np.uint8)
    prompt = f"Watch {VIDEO} and tell."
    encoder = engine.runner.model.encoder_cache
    stores = encoder.stores
    ours = engine.generate(prompt, GREEDY, return_logits=True, video_data=[frames])
    assert encoder.stores - stores == 3
    assert_same(ours, hf_generate(hf, prompt, [], [frames]))



def test_video_url_matches_transformers_with_its_timestamps(engine, hf, tmp_path):
    """A 3 s, 10 fps clip by URL: the engine samples its frames, and the frame pairs' timestamps in the prompt come
    from their indices at 10 fps, as transformers writes them from the same frames and metadata."""
    from mmserve.multimodal.media import MediaPolicy, load_video_frames
    from mmserve.multimodal.processor import sample_frame_indices

    url = video_data_url(tmp_path / "clip.mp4", frames=30, fps=10)
    prompt = f"Watch {VIDEO} now."
    ours = engine.generate(prompt, GREEDY, return_logits=True, video_data=[url])
    frames, fps = load_video_frames(url, MediaPolicy())
    index = sample_frame_indices(len(frames), fps, 2.0, 4, 768)
    metadata = {"fps": fps, "total_num_frames": len(frames), "frames_indices": index.tolist()}
    _, processor = hf
    text = processor.tokenizer.decode(processor(text=[prompt], videos=[frames[index]], video_metadata=[metadata],
                                                do_sample_frames=False)["input_ids"][0])
    assert [int(t) for t in re.findall(r"<\|end_of_image\|>(\d+)", text)] == [0, 1, 2]
    assert_same(ours, hf_generate(hf, prompt, [], [frames[index]], [metadata]))

def test_chunked_prefill_smaller_than_an_image(tiny_glm4v_dir, hf):
    prompt, images = CASES["two images of different sizes"]
    check_chunked_prefill(tiny_glm4v_dir, hf, prompt, images)


def test_prefix_cache_is_keyed_by_image_content(engine):
    check_prefix_cache_keyed_by_image(engine, IMAGE)


def test_chat_with_the_hub_template(engine, hf):
    """The hub-style template renders OpenAI image parts as transformers' processor renders its image parts, and the
    answer is transformers'."""
    from mmserve.tokenizer.chat_template import render_chat

    images = [picture(120, 90, 7), picture(60, 80, 8)]
    _, processor = hf

    def messages(*images: dict) -> list[dict]:
        return [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [images[0], {"type": "text", "text": "What is this? "}, images[1]]}]

    prompt = processor.apply_chat_template(messages({"type": "image"}, {"type": "image"}), add_generation_prompt=True)
    assert prompt == f"[gMASK]<sop><|system|>\nBe brief.<|user|>\n{IMAGE}What is this? {IMAGE}<|assistant|>\n"
    chat = messages(*({"type": "image_url", "image_url": {"url": image_data_url(img)}} for img in images))
    assert render_chat(engine.tokenizer, chat, engine.chat_template) == prompt
    ref = hf_generate(hf, prompt, images)
    assert engine.chat(chat, GREEDY)["output_ids"] == ref[0]


def test_half_rotary_layout_matches_interleaved_pairs():
    """Rotating reordered q and k in the rotate-half layout gives the interleaved rotation's scores."""
    from transformers.models.glm4v.modeling_glm4v import apply_rotary_pos_emb

    head_dim, rotary_dim, tokens = 16, 8, 5
    q, k = torch.randn(2, tokens, 2 * head_dim).unbind(0)
    angles = torch.rand(tokens, rotary_dim // 2) * 6
    cos, sin = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)
    ref_q, ref_k = apply_rotary_pos_emb(q.view(1, tokens, 2, head_dim).transpose(1, 2),
                                        k.view(1, tokens, 2, head_dim).transpose(1, 2), cos[None], sin[None])
    expected = ref_q @ ref_k.transpose(-1, -2)

    def ours(x: torch.Tensor) -> torch.Tensor:
        x = half_rotary_layout(x.T, head_dim, rotary_dim).T.reshape(tokens, 2, head_dim)
        c, s = torch.cat([angles.cos()] * 2, -1)[:, None], torch.cat([angles.sin()] * 2, -1)[:, None]
        rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
        turned = rot * c + torch.cat((-rot[..., rotary_dim // 2:], rot[..., :rotary_dim // 2]), -1) * s
        return torch.cat((turned, rest), -1).transpose(0, 1)

    torch.testing.assert_close(ours(q) @ ours(k).transpose(-1, -2), expected[0])


def test_loads_both_checkpoint_layouts(hf):
    """transformers 5's layout ("model.visual.", "model.language_model.") and the original files' ("visual.",
    "model.") fill every parameter with the same values."""
    state = hf[0].state_dict()
    original = {name.replace("model.language_model.", "model.").replace("model.visual.", "visual."): tensor
                for name, tensor in state.items()}
    models = []
    for weights in (state, original):
        model = Glm4vForConditionalGeneration(hf[0].config)
        assert model.load_weights(weights.items()) == {name for name, _ in model.named_parameters()}
        models.append(model)
    for (name, a), (_, b) in zip(models[0].named_parameters(), models[1].named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_tower_through_the_vision_graph_buffers(hf):
    """The tower planned, padded to a bucket and run from the graph runner's static buffers (eagerly here; captured
    on a GPU) gives the eager tower's rows: padding patches (frame size 0) stay finite and apart."""
    from mmserve.layers.vision import VisionGraphRunner

    model = Glm4vForConditionalGeneration(hf[0].config)
    model.load_weights(hf[0].state_dict().items())
    grids = [(1, 8, 10), (1, 6, 4)]
    pixels = [torch.randn(t * h * w, model.visual.patch_embed.proj.weight.shape[1]) for t, h, w in grids]
    graphs = VisionGraphRunner(model.visual, [256], use_graphs=False)
    graphs.capture()
    with torch.inference_mode():
        got = graphs.run(pixels, grids)
        want = model.visual(torch.cat(pixels), torch.tensor(grids))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        # the same rows as transformers' tower
        ref = hf[0].model.visual(torch.cat(pixels), grid_thw=torch.tensor(grids)).pooler_output
        torch.testing.assert_close(want, ref, atol=1e-4, rtol=1e-4)


def test_image_and_video_in_one_prompt_match_transformers_parts(engine, hf):
    """transformers' forward cannot take both in one GLM-4V prompt (its video mask is the image token's), so the
    reference is assembled from its parts: its tower's image and frame rows placed by `mm_token_type_ids`, its M-RoPE
    positions (`get_rope_index`), and its language model's next-token logits, against our first step."""
    model, processor = hf
    frames = np.random.RandomState(3).randint(0, 255, (4, 60, 80, 3), dtype=np.uint8)
    image = picture(90, 60, 4)
    prompt = f"See {IMAGE} and {VIDEO} now."
    enc = processor(text=[prompt], images=[image], videos=[frames], video_metadata=[sampled_at(2.0, frames)],
                    do_sample_frames=False, return_tensors="pt")
    inner = model.model
    with torch.no_grad():
        embeds = inner.get_input_embeddings()(enc["input_ids"])
        types = enc["mm_token_type_ids"][0]
        embeds[0, types == 1] = torch.cat(inner.get_image_features(enc["pixel_values"],
                                                                   enc["image_grid_thw"]).pooler_output)
        embeds[0, types == 2] = torch.cat(inner.get_video_features(enc["pixel_values_videos"],
                                                                   enc["video_grid_thw"]).pooler_output)
        positions, _ = inner.get_rope_index(enc["input_ids"], mm_token_type_ids=enc["mm_token_type_ids"],
                                            image_grid_thw=enc["image_grid_thw"],
                                            video_grid_thw=enc["video_grid_thw"])
        logits = model(inputs_embeds=embeds, position_ids=positions).logits[0, -1]
    assert (types == 1).sum() > 0 and (types == 2).sum() > 0
    one_step = {**GREEDY, "max_new_tokens": 1}
    ours = engine.generate(prompt, one_step, return_logits=True, image_data=[image], video_data=[frames])
    assert ours["meta_info"]["prompt_tokens"] == enc["input_ids"].shape[1]
    assert_same(ours, ([int(logits.argmax())], [logits]))


def test_two_tensor_parallel_ranks_match_transformers(tiny_glm4v_dir, hf):
    """tp_size 2 on the CPU (gloo): each rank holds half the decoder's heads (one key/value head) and half of every
    gated MLP, so the q/k reordering and the split `gate_up_proj` must land on the right rank's rows."""
    prompt, images = CASES["two images of different sizes"]
    ref_ids, ref_logits = hf_generate(hf, prompt, images)
    params = {**GREEDY, "logprobs": True}
    with Engine(model_path=str(tiny_glm4v_dir), dtype="float32", device="cpu", tp_size=2) as engine:
        ours = engine.generate(prompt, params, image_data=images)
    assert ours["output_ids"] == ref_ids
    logprobs = [entry[0] for entry in ours["meta_info"]["output_token_logprobs"]]
    expected = [step.log_softmax(-1)[token].item() for step, token in zip(ref_logits, ref_ids, strict=True)]
    assert torch.allclose(torch.tensor(logprobs), torch.tensor(expected), atol=1e-4)
