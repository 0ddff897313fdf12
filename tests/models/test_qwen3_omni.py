"""The Qwen3-Omni thinker against transformers on a tiny random model (float32, CPU): text only, one audio clip (over
one 1 s chunk and one attention window), two clips, an image with a clip (DeepStack at the image rows, none at the
audio rows, M-RoPE positions of both), a video with a clip, WAV bytes, a chat's input_audio part through the template,
a repeated clip served from the prefix cache, chunked prefill through audio tokens (clips of different lengths), the
audio tower's token count, and both checkpoint layouts. A video with its own sound (use_audio_in_video): ids, M-RoPE
positions, tokens and logits as transformers' (the sound outlasting the frames, and the frames outlasting it after a
clip), through chunked prefill, keyed apart from the same video without its sound, and the refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from audio_helpers import AUDIO, hf_generate, hf_video_with_sound, tone, video_with_sound, wav_bytes
from vl_helpers import GREEDY, IMAGE, NEW_TOKENS, VIDEO, assert_same, picture

from mmserve import Engine


@pytest.fixture(scope="module")
def hf(tiny_qwen3_omni_dir):
    from transformers import AutoProcessor, Qwen3OmniMoeThinkerForConditionalGeneration

    model = Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(tiny_qwen3_omni_dir,
                                                                        dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(tiny_qwen3_omni_dir)


@pytest.fixture(scope="module")
def engine(tiny_qwen3_omni_dir):
    with Engine(model_path=str(tiny_qwen3_omni_dir), dtype="float32") as e:
        yield e


# Two clips in one prompt have the same length: transformers' feature extractor pads the shorter of a batch
# with zeros, which changes its last frames against the clip alone (mmserve prepares each clip alone).
CASES = {
    "text only": ("Just some text without sound, long enough that many experts get tokens.", [], []),
    "one clip": (f"Listen: {AUDIO} What is it?", [], [tone(440, 1.5)]),
    "two clips": (f"Compare {AUDIO} with {AUDIO} please.", [], [tone(440, 2.0), tone(250, 2.0)]),
    "image and clip": (f"See {IMAGE} and hear {AUDIO} now.", [picture(150, 100, 0)], [tone(600, 1.25)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers(case, engine, hf):
    prompt, images, audios = CASES[case]
    ours = engine.generate(prompt, GREEDY, return_logits=True, image_data=images or None, audio_data=audios or None)
    assert_same(ours, hf_generate(hf, prompt, images, audios))


def test_images_prepared_in_the_engine(tiny_qwen3_omni_dir, hf):
    """--mm-image-prep engine (the GPU's default): the image planned and resized in the API process, patched in the
    engine, beside a clip; transformers' answer. (transformers 5.17's Omni processor cannot expand a placeholder
    from a grid: there the images stay prepared in the API process, and the answer is the same.)"""
    prompt, images, audios = CASES["image and clip"]
    with Engine(model_path=str(tiny_qwen3_omni_dir), dtype="float32", mm_image_prep="engine") as e:
        assert e.processor.images_in_engine == ("replace_image_token" in vars(type(e.processor.hf)))
        ours = e.generate(prompt, GREEDY, return_logits=True, image_data=images, audio_data=audios)
    assert_same(ours, hf_generate(hf, prompt, images, audios))


def test_wav_bytes_match_the_samples(engine, hf):
    """A WAV file decodes (PyAV) to the samples it was written from, so its answer is transformers' on them."""
    prompt, _, audios = CASES["one clip"]
    ours = engine.generate(prompt, GREEDY, return_logits=True, audio_data=[wav_bytes(audios[0])])
    assert_same(ours, hf_generate(hf, prompt, [], audios))


def test_prefix_cache_is_keyed_by_clip_content(engine):
    clip = wav_bytes(tone(330, 1.2))
    prompt = f"Hear {AUDIO} and tell me."
    first = engine.generate(prompt, GREEDY, audio_data=[clip])
    again = engine.generate(prompt, GREEDY, audio_data=[clip])
    changed = engine.generate(prompt, GREEDY, audio_data=[wav_bytes(tone(331, 1.2))])
    assert again["meta_info"]["cached_tokens"] == again["meta_info"]["prompt_tokens"] - 1
    assert again["output_ids"] == first["output_ids"]
    assert changed["meta_info"]["cached_tokens"] <= prompt.index(AUDIO)


def test_chunked_prefill_through_audio_tokens(tiny_qwen3_omni_dir, hf):
    """Prefill chunks of 8 tokens cut both clips (26 and 20 tokens): each clip encoded once, then sliced."""
    prompt, audios = f"Compare {AUDIO} with {AUDIO} please.", [tone(440, 2.0), tone(250, 1.5)]
    with Engine(model_path=str(tiny_qwen3_omni_dir), dtype="float32", chunked_prefill_size=8,
                disable_radix_cache=True) as small:
        ours = small.generate(prompt, GREEDY, return_logits=True, audio_data=audios)
        assert small.scheduler.stats.prefill_steps >= 6
        encoder = small.runner.model.encoder_cache
        assert encoder.stores == 2 and encoder.hits >= 4
    # transformers would zero-pad the shorter clip's waveform beside the longer: its reference is each clip's own
    # features, as a one-clip call gives them
    model, processor = hf
    singles = [processor(text=[AUDIO], audio=[a], return_tensors="pt") for a in audios]
    frames = [s["input_features"].shape[-1] for s in singles]
    features = torch.zeros(2, singles[0]["input_features"].shape[1], max(frames))
    mask = torch.zeros(2, max(frames), dtype=torch.long)
    for i, s in enumerate(singles):
        features[i, :, :frames[i]] = s["input_features"][0]
        mask[i, :frames[i]] = 1
    ids = processor(text=[prompt], audio=audios, return_tensors="pt")["input_ids"]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), input_features=features,
                         feature_attention_mask=mask, do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=None,
                         output_logits=True, return_dict_in_generate=True)
    assert_same(ours, (out.sequences[0, ids.shape[1]:].tolist(), [lg[0] for lg in out.logits]))


def test_audio_token_count_matches_the_processor(hf):
    from mmserve.multimodal.processors.qwen3_omni import audio_tokens

    processor = hf[1]
    audio_id = processor.tokenizer.convert_tokens_to_ids("<|audio_pad|>")
    for seconds in (0.3, 1.0, 1.01, 2.5):
        ids = processor(text=[AUDIO], audio=[tone(200, seconds)], return_tensors="pt")["input_ids"][0]
        assert audio_tokens(int(seconds * 100), 50) == int((ids == audio_id).sum())


def test_video_and_clip_match_transformers(engine, hf):
    """A video is one placeholder run whose frame pairs are 2 s (at the processor's default 1 fps timing) x 13
    positions apart, so the text after it resumes past its last time step, not past its grid's side."""
    from vl_helpers import sampled_at

    frames = np.random.RandomState(9).randint(0, 255, (8, 60, 80, 3), dtype=np.uint8)
    prompt, clip = f"Watch {VIDEO} and hear {AUDIO} then say.", tone(300, 1.0)
    ours = engine.generate(prompt, GREEDY, return_logits=True, video_data=[frames], audio_data=[clip])
    model, processor = hf
    enc = processor(text=[prompt], videos=[frames], audio=[clip], video_metadata=[sampled_at(2.0, frames)],
                    do_sample_frames=False, return_tensors="pt")
    out = model.generate(**enc, do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=None, output_logits=True,
                         return_dict_in_generate=True)
    assert_same(ours, (out.sequences[0, enc["input_ids"].shape[1]:].tolist(), [lg[0] for lg in out.logits]))


def test_chat_with_an_input_audio_part(engine, hf):
    """Engine.chat puts the clip's placeholder in through the model's template, from an OpenAI input_audio part."""
    import base64

    clip = tone(440, 1.5)
    part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav_bytes(clip)).decode(), "format": "wav"}}
    ours = engine.chat([{"role": "user", "content": [part, {"type": "text", "text": "What is it?"}]}], GREEDY)
    prompt = hf[1].apply_chat_template([{"role": "user", "content": [{"type": "audio"}, {
        "type": "text", "text": "What is it?"}]}], add_generation_prompt=True)
    assert ours["output_ids"] == hf_generate(hf, prompt, [], [clip])[0]


def test_loads_both_checkpoint_layouts(hf, tiny_qwen3_omni_dir):
    """transformers 5's names ("model.audio_tower.", "model.visual.", "model.language_model.", fused experts) and the
    saved files' ("audio_tower.", "visual.", "model.", one tensor per expert) fill every parameter alike."""
    from safetensors.torch import load_file

    from mmserve.models.qwen3_omni import Qwen3OmniMoeThinkerForConditionalGeneration

    saved = load_file(str(tiny_qwen3_omni_dir / "model.safetensors"))
    assert "audio_tower.conv2d1.weight" in saved and "visual.merger_list.0.ln_q.weight" in saved
    models = []
    for weights in (hf[0].state_dict(), saved):
        model = Qwen3OmniMoeThinkerForConditionalGeneration(hf[0].config)
        assert model.load_weights(weights.items()) == {name for name, _ in model.named_parameters()}
        models.append(model)
    for (name, a), (_, b) in zip(models[0].named_parameters(), models[1].named_parameters(), strict=True):
        assert torch.equal(a, b), name


SOUND = {"use_audio_in_video": True}
# (prompt, frames: 2 a second, the video's sound in seconds, standalone clips before it). Frame pairs are 26 positions
# apart and sound tokens one: 4 frames under 3 s of sound (39 tokens) end with sound; 8 frames under 2.5 s (33 tokens)
# end with two frame pairs. A clip beside the video is as long as its sound: transformers pads shorter clips of a call.
AV_CASES = {
    "sound outlasts the frames": (f"Watch {VIDEO} now.", 4, 3.0, []),
    "frames outlast the sound, after a clip": (f"Hear {AUDIO} then watch {VIDEO} and say.", 8, 2.5, [tone(500, 2.5)]),
}


def av_case(case: str) -> tuple[str, np.ndarray, np.ndarray, bytes, list[np.ndarray]]:
    prompt, count, seconds, clips = AV_CASES[case]
    frames = np.random.RandomState(count).randint(0, 255, (count, 60, 80, 3), dtype=np.uint8)
    sound = tone(300, seconds)
    return prompt, frames, sound, video_with_sound(frames, 2, sound), clips


def hf_av_generate(hf, prompt, frames, sound, clips):
    model, processor = hf
    enc = hf_video_with_sound(processor, prompt, frames, 2.0, sound, clips)
    out = model.generate(**enc, use_audio_in_video=True, do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=None,
                         output_logits=True, return_dict_in_generate=True)
    return enc, (out.sequences[0, enc["input_ids"].shape[1]:].tolist(), [lg[0] for lg in out.logits])


@pytest.mark.parametrize("case", list(AV_CASES))
def test_video_with_its_sound_matches_transformers(case, engine, hf):
    """The sound track decoded from the video's own bytes, merged with its frame pairs by time: the processor's
    ids, get_rope_index's positions, and the greedy tokens and logits of generate(use_audio_in_video=True)."""
    prompt, frames, sound, data, clips = av_case(case)
    ours = engine.generate(prompt, GREEDY, return_logits=True, video_data=[data], audio_data=clips or None,
                           mm_processor_kwargs=SOUND)
    enc, ref = hf_av_generate(hf, prompt, frames, sound, clips)
    assert_same(ours, ref)
    ids, mm = engine.processor.process(prompt, [("video", data), *[("audio", c) for c in clips]],
                                       engine.processor.settings_for(SOUND))
    assert ids == enc["input_ids"][0].tolist()
    positions, delta = hf[0].get_rope_index(enc["input_ids"], None, enc["video_grid_thw"], enc["attention_mask"],
                                            True, enc["feature_attention_mask"].sum(-1), enc["video_second_per_grid"])
    assert torch.equal(mm.mrope_positions, positions[:, 0].long()) and mm.mrope_delta == int(delta)
    video = next(it for it in mm.items if it.modality == "video")
    assert int(video.features["audio_rows"].sum()) == int((enc["input_ids"] == hf[0].config.audio_token_id).sum()) \
        - sum(it.length for it in mm.items if it.modality == "audio")


def test_video_with_its_sound_through_chunked_prefill(tiny_qwen3_omni_dir, hf):
    """Prefill chunks of 8 tokens cut the clip (33 tokens) and the merged video (80 frame tokens and 33 sound tokens
    in six runs): each encoded once, then sliced."""
    prompt, frames, sound, data, clips = av_case("frames outlast the sound, after a clip")
    with Engine(model_path=str(tiny_qwen3_omni_dir), dtype="float32", chunked_prefill_size=8,
                disable_radix_cache=True) as small:
        ours = small.generate(prompt, GREEDY, return_logits=True, video_data=[data], audio_data=clips,
                              mm_processor_kwargs=SOUND)
        assert small.scheduler.stats.prefill_steps >= 20
        assert small.runner.model.encoder_cache.stores == 2
    assert_same(ours, hf_av_generate(hf, prompt, frames, sound, clips)[1])


def test_a_video_with_and_without_its_sound_are_different_items(engine, hf):
    """The same bytes with use_audio_in_video and without are two cache entries, processor and encoder: the plain
    video after the merged one is still transformers' plain video."""
    prompt, frames, _, data, _ = av_case("sound outlasts the frames")
    settings = engine.processor.settings_for(SOUND)
    merged = engine.processor.process(prompt, [("video", data)], settings)[1].items[0]
    plain = engine.processor.process(prompt, [("video", data)])[1].items[0]
    assert merged.hash != plain.hash and plain.length < merged.length
    engine.generate(prompt, GREEDY, video_data=[data], mm_processor_kwargs=SOUND)
    ours = engine.generate(prompt, GREEDY, return_logits=True, video_data=[data])
    model, processor = hf
    enc = processor(text=[prompt], videos=[frames], return_tensors="pt", do_sample_frames=False,
                    video_metadata=[{"fps": 2.0, "total_num_frames": 4, "frames_indices": [0, 1, 2, 3]}])
    out = model.generate(**enc, do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=None, output_logits=True,
                         return_dict_in_generate=True)
    assert_same(ours, (out.sequences[0, enc["input_ids"].shape[1]:].tolist(), [lg[0] for lg in out.logits]))


def test_videos_without_sound_are_refused_by_name(engine):
    frames = np.random.RandomState(1).randint(0, 255, (4, 60, 80, 3), dtype=np.uint8)
    silent = video_with_sound(frames, 2, None)
    for video, prompt, message in [
        (silent, f"See {VIDEO}", "video 0: no audio track, which use_audio_in_video needs"),
        (frames, f"See {VIDEO}", "video 0: frames given as an array have no sound track"),
        (av_case("sound outlasts the frames")[3], "See <|video_pad|> alone",
         "every video placeholder must follow <|vision_start|>"),
    ]:
        with pytest.raises(ValueError, match=message):
            engine.generate(prompt, GREEDY, video_data=[video], mm_processor_kwargs=SOUND)
    with pytest.raises(ValueError, match="use_audio_in_video must be true or false, got 1"):
        engine.generate(f"See {VIDEO}", GREEDY, video_data=[silent], mm_processor_kwargs={"use_audio_in_video": 1})
    assert engine.generate(f"See {VIDEO}", GREEDY, video_data=[silent])["output_ids"]  # without it: served
