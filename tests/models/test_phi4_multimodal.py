"""Phi-4-multimodal against transformers on a tiny random model (float32, CPU): text only, one image (a global view
and one padded crop: 463 tokens), two images of 5 and 2 crops, one audio clip, an image with a clip (the clip through
the vision-speech projection), chunked prefill through image and audio tokens, a repeated image and a repeated clip
from the prefix cache (the clip beside an image not confused with the clip alone), every parameter loaded,
LongRoPE's table past the original context, and LoRA adapters in the checkpoint refused."""

from __future__ import annotations

import pytest
import torch
from audio_helpers import hf_generate, tone, wav_bytes
from vl_helpers import GREEDY, assert_same, check_chunked_prefill, picture

from mmserve import Engine

IMAGE, AUDIO = "<|image|>", "<|audio|>"


@pytest.fixture(scope="module")
def hf(tiny_phi4_multimodal_dir):
    from transformers import AutoProcessor, Phi4MultimodalForCausalLM

    # eager attention: transformers' SDPA path makes the vision tower causal wherever a crop has no padding (it
    # passes no mask then, and the tower's attention is marked causal); SigLIP's blocks, and eager, see both ways
    model = Phi4MultimodalForCausalLM.from_pretrained(tiny_phi4_multimodal_dir, dtype=torch.float32,
                                                      attn_implementation="eager").eval()
    return model, AutoProcessor.from_pretrained(tiny_phi4_multimodal_dir)


@pytest.fixture(scope="module")
def engine(tiny_phi4_multimodal_dir):
    with Engine(model_path=str(tiny_phi4_multimodal_dir), dtype="float32") as e:
        yield e


CASES = {
    "text only": ("Just some text, long enough to pass the rotary's first few positions.", [], []),
    # 150x100 becomes one 448x448 crop whose lower rows are padding: the positions of its patches spread over the
    # unpadded part, the padding is cut from its pooled rows
    "one image": (f"Look {IMAGE} and say.", [picture(150, 100, 0)], []),
    # 1.3 s: 128 frames, 16 encoder steps, in streaming chunks of 6 (the last one short)
    "one clip": (f"Hear {AUDIO} and say.", [], [tone(440, 1.3)]),
    "image and clip": (f"See {IMAGE} hear {AUDIO} now.", [picture(100, 130, 3)], [tone(300, 0.9)]),
    # 500x460: the global view and a 2x2 grid of crops, the lower two padded; transformers pads the other image's
    # crops to five, mmserve prepares each image alone
    "two images": (f"Look {IMAGE} and {IMAGE} there.", [picture(500, 460, 5), picture(130, 130, 6)], []),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers(case, engine, hf):
    prompt, images, audios = CASES[case]
    ours = engine.generate(prompt, GREEDY, return_logits=True, image_data=images or None, audio_data=audios or None)
    assert_same(ours, hf_generate(hf, prompt, images, audios))


def test_chunked_prefill_through_image_tokens(tiny_phi4_multimodal_dir, hf):
    check_chunked_prefill(tiny_phi4_multimodal_dir, hf, f"See {IMAGE} now.", [picture(120, 90, 1)])


def test_chunked_prefill_through_audio_tokens(tiny_phi4_multimodal_dir, hf):
    """Chunks of 8 tokens cut the clip's 38 tokens (past the relative bias's 20-step reach): it is encoded once and
    sliced for each chunk."""
    prompt, audios = f"Listen {AUDIO} please.", [tone(500, 3.0)]
    with Engine(model_path=str(tiny_phi4_multimodal_dir), dtype="float32", chunked_prefill_size=8,
                disable_radix_cache=True) as small:
        ours = small.generate(prompt, GREEDY, return_logits=True, audio_data=audios)
        assert small.scheduler.stats.prefill_steps >= 4
        encoder = small.runner.model.encoder_cache
        assert encoder.stores == 1 and encoder.hits >= 4
    assert_same(ours, hf_generate(hf, prompt, [], audios))


def test_repeated_image_reuses_the_prefix_cache(engine):
    image = picture(100, 140, 2)
    prompt = f"Describe {IMAGE} briefly."
    first = engine.generate(prompt, GREEDY, image_data=[image])
    again = engine.generate(prompt, GREEDY, image_data=[image])
    assert again["meta_info"]["cached_tokens"] == again["meta_info"]["prompt_tokens"] - 1
    assert again["output_ids"] == first["output_ids"]


def test_repeated_clip_reuses_the_prefix_cache_but_not_beside_an_image(engine, hf):
    """A clip beside an image is projected otherwise: the same clip after an image in another prompt is not served
    from the clip-alone entries of either cache, and gives transformers' answer."""
    clip = tone(350, 1.1)
    prompt = f"Hear {AUDIO} and tell."
    first = engine.generate(prompt, GREEDY, audio_data=[wav_bytes(clip)])
    again = engine.generate(prompt, GREEDY, audio_data=[wav_bytes(clip)])
    assert again["meta_info"]["cached_tokens"] == again["meta_info"]["prompt_tokens"] - 1
    assert again["output_ids"] == first["output_ids"]
    beside = f"{IMAGE} Hear {AUDIO} and tell."
    image = picture(90, 90, 4)
    ours = engine.generate(beside, GREEDY, return_logits=True, image_data=[image], audio_data=[wav_bytes(clip)])
    assert_same(ours, hf_generate(hf, beside, [image], [clip]))


def test_lora_adapters_are_refused(hf, tiny_phi4_multimodal_dir, tmp_path):
    """The hub folder's `vision-lora/` and `speech-lora/` PEFT adapters, and adapter tensors among the weights."""
    import shutil

    from transformers import AutoConfig

    from mmserve.models.phi4_multimodal import Phi4MultimodalForCausalLM

    config = hf[0].config
    model = Phi4MultimodalForCausalLM(config)
    lora = [("model.layers.0.self_attn.qkv_proj.lora_A.vision.weight", torch.zeros(4, config.hidden_size))]
    with pytest.raises(ValueError, match="LoRA adapters"):
        model.load_weights(lora)
    shutil.copy(tiny_phi4_multimodal_dir / "config.json", tmp_path)
    for name in ("vision-lora", "speech-lora"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"LoRA adapters \(speech-lora, vision-lora\)"):
        Phi4MultimodalForCausalLM(AutoConfig.from_pretrained(tmp_path))


def test_longrope_turns_positions_past_the_original_context_with_the_long_factors(hf):
    """Within 2048 positions the table is transformers' (the cases above); past it, the long factors, as
    transformers uses them for a sequence that long."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from mmserve.models.phi4_multimodal import longrope_rotary

    config = hf[0].config
    rotary = longrope_rotary(config)
    long_inv_freq, scale = ROPE_INIT_FUNCTIONS["longrope"](config, None, seq_len=4000)
    assert scale > 1.0
    pos = torch.tensor([2048.0, 5000.0])
    freqs = torch.outer(pos, long_inv_freq)
    expected = torch.cat((freqs, freqs), dim=-1).cos() * scale
    assert torch.allclose(rotary.cos_cache[[2048, 5000]], expected, atol=1e-6)


def test_loads_every_parameter(hf):
    """The fused q/k/v and gate/up split into our merged layers' shards; the tower's unused last block, its final
    norm and pooling head, and the audio embedding are the only checkpoint tensors left out."""
    from mmserve.models.phi4_multimodal import Phi4MultimodalForCausalLM

    model = Phi4MultimodalForCausalLM(hf[0].config)
    state = hf[0].state_dict()
    assert model.load_weights(state.items()) == {name for name, _ in model.named_parameters()}
    ref = state["model.layers.1.self_attn.qkv_proj.weight"]
    assert torch.equal(model.model.layers[1].self_attn.qkv_proj.weight, ref)


def test_chat_with_image_and_audio_parts(engine, hf):
    """Engine.chat renders OpenAI image_url and input_audio parts through the folder's hub-style template (the
    tokenizer's copy: the processor's is lost on reload) to the prompt transformers renders, with its answer."""
    import base64

    from vl_helpers import image_data_url

    image, clip = picture(120, 100, 7), tone(620, 0.8)
    audio = {"data": base64.b64encode(wav_bytes(clip)).decode(), "format": "wav"}
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_data_url(image)}},
                                             {"type": "input_audio", "input_audio": audio},
                                             {"type": "text", "text": "What is here?"}]}]
    ours = engine.chat(messages, GREEDY)
    prompt = hf[1].tokenizer.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "audio"}, {"type": "text", "text": "What is here?"}]}],
        add_generation_prompt=True, tokenize=False)
    assert prompt == "<|user|><|image|><|audio|>What is here?<|end|><|assistant|>"
    assert ours["output_ids"] == hf_generate(hf, prompt, [image], [clip])[0]


def test_long_clip_is_encoded_in_blocks_of_500_steps(hf):
    """Past 500 steps (40 s) transformers cuts a clip into zero-padded blocks of 500 that the Conformer sees apart;
    the encoder alone against transformers' on 4100 random frames (513 steps: a second block of 13)."""
    from mmserve.models.phi4_multimodal import Phi4MultimodalForCausalLM

    model = Phi4MultimodalForCausalLM(hf[0].config)
    model.load_weights(hf[0].state_dict().items())
    frames = torch.randn(4100, 80, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.audio_embed.encoder(frames)
        ref = hf[0].model.embed_tokens_extend.audio_embed.encoder(frames[None], None)[0]
    assert ours.shape == (513, 32)
    assert (ours - ref).abs().max().item() < 1e-4
