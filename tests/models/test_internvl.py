"""InternVL 3 / 3.5 against transformers on tiny random models (float32, CPU): text only, one image, two images of
different tile counts (4 and 7 tiles with the thumbnail, and a one-tile image in the Qwen3 test), a video given as
frame arrays and one as an MP4 URL in chat (one tile per frame, "FrameN: " labels), a repeated image from the prefix
cache, chunked prefill smaller than an image, chat through the hub's template and through the named `internvl-2-5`
template, the Qwen3 decoder with the other InternViT switches (RMSNorm, q/k norm, the final LayerNorm), and an
earlier feature layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from vl_helpers import GREEDY, assert_same, check_chunked_prefill, hf_generate, picture

from mmserve import Engine

IMAGE, VIDEO = "<IMG_CONTEXT>", "<video>"


def chat(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def load_hf(folder):
    from transformers import AutoProcessor, InternVLForConditionalGeneration

    model = InternVLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(folder)


@pytest.fixture(scope="module")
def hf(tiny_internvl_dir):
    return load_hf(tiny_internvl_dir)


@pytest.fixture(scope="module")
def engine(tiny_internvl_dir):
    with Engine(model_path=str(tiny_internvl_dir), dtype="float32") as e:
        yield e


def frames(count: int, seed: int, size: tuple[int, int] = (50, 40)) -> np.ndarray:
    width, height = size
    return np.random.RandomState(seed).randint(0, 255, (count, height, width, 3), dtype=np.uint8)


CASES = {
    # a 3x1 grid and its thumbnail
    "one image": (chat(f"{IMAGE}\nDescribe it briefly."), [picture(100, 30, 0)]),
    # 4 tiles (1x3 + thumbnail) and 7 (2x3 + thumbnail), the first two adjacent
    "two images of different sizes": (chat(f"Compare {IMAGE}{IMAGE}\nnow."), [picture(30, 90, 1),
                                                                              picture(200, 150, 2)]),
    "text only": (chat("Just some text without pictures."), []),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers(case, engine, hf):
    prompt, images = CASES[case]
    ours = engine.generate(prompt, GREEDY, return_logits=True, image_data=images if images else None)
    assert_same(ours, hf_generate(hf, prompt, images))


def test_tile_counts_vary(hf):
    """The cases above are the tile counts they say: the thumbnail comes with several tiles, not with one."""
    _, processor = hf
    tiles = [len(processor(text=[IMAGE], images=[picture(w, h, 0)], return_tensors="pt")["pixel_values"])
             for w, h in ((100, 30), (30, 90), (200, 150), (28, 28))]
    assert tiles == [4, 4, 7, 1]


def test_video_matches_transformers(engine, hf):
    """Frames given as arrays are taken as sampled already; each is one tile after its "FrameN: " label, and an
    image in the same prompt comes before it."""
    clip = frames(3, 5)
    image = picture(60, 60, 6)
    prompt = chat(f"{IMAGE}\nand {VIDEO}\nWhat happens?")
    ours = engine.generate(prompt, GREEDY, return_logits=True, image_data=[image], video_data=[clip])
    assert_same(ours, hf_generate(hf, prompt, [image], [clip]))


def test_video_url_chat_matches_transformers_on_the_sampled_frames(engine, hf, tmp_path):
    """An MP4 in a `video_url` part is decoded and sampled at 2 frames a second (at least 4, an even count), rendered
    by the hub's template as `<video>`; transformers gets the same frames."""
    from vl_helpers import video_data_url

    from mmserve.multimodal.media import MediaPolicy, load_video_frames
    from mmserve.multimodal.processor import sample_frame_indices

    url = video_data_url(tmp_path / "clip.mp4", frames=30, fps=10)  # 3 s: 6 frames
    decoded, fps = load_video_frames(url, MediaPolicy())
    sampled = decoded[sample_frame_indices(len(decoded), fps, 2.0, 4, 768)]
    assert len(sampled) == 6
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                             {"type": "text", "text": "What happens?"}]}]
    prompt = chat(f"{VIDEO}\nWhat happens?")
    ref = hf_generate(hf, prompt, [], [sampled])
    assert engine.chat(messages, GREEDY)["output_ids"] == ref[0]
    assert_same(engine.generate(prompt, GREEDY, return_logits=True, video_data=[url]), ref)
    # a request's frame count (mm_processor_kwargs) steers mmserve's sampling
    four = decoded[sample_frame_indices(len(decoded), fps, 2.0, 4, 4)]
    ours = engine.generate(prompt, GREEDY, return_logits=True, video_data=[url], mm_processor_kwargs={"num_frames": 4})
    assert_same(ours, hf_generate(hf, prompt, [], [four]))


def test_tiling_options_are_refused_per_request(engine):
    """The tile grid is the checkpoint's processor's (`max_patches`, `crop_to_patches`): a request asking for
    another is refused by name."""
    for key in ("max_patches", "crop_to_patches"):
        with pytest.raises(ValueError, match=key):
            engine.generate(chat(f"{IMAGE}\nHi"), GREEDY, image_data=[picture(100, 30, 0)],
                            mm_processor_kwargs={key: 2})


def test_repeated_image_hits_the_prefix_cache(engine, hf):
    prompt, images = CASES["one image"]
    engine.generate(prompt, GREEDY, image_data=images)
    again = engine.generate(prompt, GREEDY, return_logits=True, image_data=[images[0].copy()])
    assert again["meta_info"]["cached_tokens"] == again["meta_info"]["prompt_tokens"] - 1
    assert_same(again, hf_generate(hf, prompt, images))
    # same size, other pixels: only the text before the image and its `<img>` token are shared
    other = picture(*images[0].size, seed=99)
    changed = engine.generate(prompt, GREEDY, image_data=[other])
    shared = len(engine.tokenizer(prompt[:prompt.index(IMAGE)])["input_ids"]) + 1
    assert changed["meta_info"]["cached_tokens"] <= shared


def test_chunked_prefill_smaller_than_an_image(tiny_internvl_dir, hf):
    """8-token chunks through images of 16 and 28 context tokens."""
    prompt, images = CASES["two images of different sizes"]
    check_chunked_prefill(tiny_internvl_dir, hf, prompt, images)


def test_chat_with_the_hub_template(engine, hf):
    """The hub's template (ChatML, no default system prompt, media where they stand) renders OpenAI image parts as
    transformers' processor renders its messages, with transformers' answer; the named `internvl-2-5` template
    renders the same with InternVL's default system prompt."""
    from vl_helpers import image_data_url

    from mmserve.tokenizer.chat_template import render_chat

    images = [picture(100, 30, 7), picture(60, 60, 8)]
    _, processor = hf
    prompt = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "What is this? "}, {"type": "image"}]}], add_generation_prompt=True)
    assert prompt == chat(f"{IMAGE}\nWhat is this? {IMAGE}\n")
    parts = [{"type": "image_url", "image_url": {"url": image_data_url(img)}} for img in images]
    messages = [{"role": "user", "content": [parts[0], {"type": "text", "text": "What is this? "}, parts[1]]}]
    assert render_chat(engine.tokenizer, messages, engine.chat_template) == prompt
    ref = hf_generate(hf, prompt, images)
    assert engine.chat(messages, GREEDY)["output_ids"] == ref[0]

    system = ("你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的"
              "多模态大语言模型。")
    named = render_chat(engine.tokenizer, messages, "internvl-2-5")
    assert named == f"<|im_start|>system\n{system}<|im_end|>\n{prompt}"
    own = [{"role": "system", "content": "Be brief."}, *messages]
    assert render_chat(engine.tokenizer, own, "internvl-2-5") == processor.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": "What is this? "}, {"type": "image"}]}],
        add_generation_prompt=True)


def test_qwen3_backbone_matches_transformers(tiny_internvl_qwen3_dir):
    """InternVL 3.5: the Qwen3 decoder (q/k norms) with tied embeddings, under a tower with RMSNorm, q/k norm over
    all heads, unbiased q/k/v and the final LayerNorm; a one-tile image (no thumbnail) beside a 4-tile one."""
    ref = load_hf(tiny_internvl_qwen3_dir)
    prompt = chat(f"{IMAGE}\nversus {IMAGE}\nWhich?")
    images = [picture(28, 28, 3), picture(100, 30, 4)]
    with Engine(model_path=str(tiny_internvl_qwen3_dir), dtype="float32") as e:
        assert_same(e.generate(prompt, GREEDY, return_logits=True, image_data=images), hf_generate(ref, prompt, images))
        text = chat("Only words here.")
        assert_same(e.generate(text, GREEDY, return_logits=True), hf_generate(ref, text, []))


def test_unsupported_settings_are_refused(hf):
    from mmserve.models.internvl import InternVLForConditionalGeneration

    model, _ = hf
    for key, value, match in (("vision_feature_select_strategy", "full", "vision_feature_select_strategy"),
                              ("vision_feature_layer", [-1, -2], "vision_feature_layer"),
                              ("downsample_ratio", 0.4, "downsample_ratio")):
        config = model.config.__class__.from_dict(model.config.to_dict())
        setattr(config, key, value)
        with pytest.raises(ValueError, match=match):
            InternVLForConditionalGeneration(config)


def test_an_earlier_feature_layer_and_the_in_memory_layout(hf):
    """vision_feature_layer -2 (the first block's output: no final norm even where the tower has one) gives
    transformers' projected image features, and the weights load from transformers 5's in-memory names
    ("model.vision_tower.", "model.language_model.", "lm_head."), filling every parameter."""
    from transformers import InternVLForConditionalGeneration as HFInternVL

    from mmserve.models.internvl import InternVLForConditionalGeneration

    config = hf[0].config.__class__.from_dict(hf[0].config.to_dict())
    config.vision_feature_layer = -2
    config.vision_config.use_mean_pooling = False
    torch.manual_seed(0)
    ref = HFInternVL(config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.2)
    ours = InternVLForConditionalGeneration(config).eval()
    assert ours.load_weights(ref.state_dict().items()) == {name for name, _ in ours.named_parameters()}
    tiles = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        want = ref.model.get_image_features(pixel_values=tiles, vision_feature_layer=-2,
                                           vision_feature_select_strategy="default")
        want = getattr(want, "pooler_output", want)
        assert (ours.tile_features(tiles) - want).abs().max() < 1e-5
