"""Gemma 3 against transformers on a tiny random model (float32, CPU): text only, one image, several images,
chunked prefill smaller than an image (the chunks bend around the images' bidirectional spans), and chat through
the hub-style template. The sliding window (8 tokens) is shorter than an image (16 tokens), so the window and the
bidirectional spans are exercised together."""

from __future__ import annotations

import pytest
import torch
from vl_helpers import GREEDY, assert_same, hf_generate, image_data_url, picture

from mmserve import Engine

IMAGE = "<start_of_image>"


@pytest.fixture(scope="module")
def hf(tiny_gemma3_dir):
    from transformers import AutoProcessor, Gemma3ForConditionalGeneration

    model = Gemma3ForConditionalGeneration.from_pretrained(tiny_gemma3_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(tiny_gemma3_dir)


@pytest.fixture(scope="module")
def engine(tiny_gemma3_dir):
    with Engine(model_path=str(tiny_gemma3_dir), dtype="float32") as e:
        yield e


# The processor puts "\n\n" around each image; next to the prompt's own newlines and words it tokenises as part of
# the text ("\n" + "\n\n" is not "\n" "\n\n"), as transformers tokenises the expanded prompt.
CASES = {
    "one image": (f"<start_of_turn>user\n{IMAGE}Describe it briefly.<end_of_turn>\n<start_of_turn>model\n",
                  [picture(150, 100, 0)]),
    "three images": (f"Compare{IMAGE} with{IMAGE}{IMAGE}\nnow, please.",
                     [picture(90, 120, 1), picture(200, 60, 2), picture(64, 64, 3)]),
    "text only": ("<start_of_turn>user\nJust some text without pictures.<end_of_turn>\n<start_of_turn>model\n", []),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers(case, engine, hf):
    prompt, images = CASES[case]
    ours = engine.generate(prompt, GREEDY, return_logits=True, image_data=images if images else None)
    assert_same(ours, hf_generate(hf, prompt, images))


def test_image_tokens_attend_both_ways(engine, hf):
    """Without the bidirectional spans the answer moves: the test above would catch a causal-only image."""
    prompt, images = CASES["one image"]
    model, processor = hf
    enc = processor(text=[prompt], images=images, return_tensors="pt")
    with torch.no_grad():
        both = model(**enc).logits[0, -1]
        causal = model(**{k: v for k, v in enc.items() if k != "token_type_ids"}).logits[0, -1]
    assert (both - causal).abs().max() > 1e-2
    ours = engine.generate(prompt, {**GREEDY, "max_new_tokens": 1}, return_logits=True, image_data=images)
    assert (ours["meta_info"]["logits"][0] - both).abs().max() < 1e-4


def test_chunked_prefill_smaller_than_an_image(tiny_gemma3_dir, hf):
    """8-token chunks: each 16-token image goes whole into one step (a chunk ends before an image, or runs past the
    budget to its end), and the answer is transformers'."""
    prompt, images = CASES["three images"]
    with Engine(model_path=str(tiny_gemma3_dir), dtype="float32", chunked_prefill_size=8,
                disable_radix_cache=True) as small:
        steps = []
        forward = small.runner.forward

        def spy(batch, *args, **kwargs):
            steps.append((batch.seq_lens_cpu[0] - batch.extend_lens_cpu[0], batch.seq_lens_cpu[0],
                          batch.bidirectional_spans))
            return forward(batch, *args, **kwargs)

        small.runner.forward = spy
        ours = small.generate(prompt, GREEDY, return_logits=True, image_data=images)
        assert small.runner.model.encoder_cache.stores == len(images)
    prefill = [(lo, hi, spans) for lo, hi, spans in steps if spans is not None]
    spans = prefill[0][2][0]
    assert len(spans) == 3 and all(end - start == 16 for start, end in spans)
    assert len(prefill) >= 4
    for lo, hi, _ in prefill:
        assert not any(start < hi < end for start, end in spans), (lo, hi, spans)
    assert any(hi - lo > 8 for lo, hi, _ in prefill)  # an image past the chunk budget
    assert all(spans is None for _, _, spans in steps[len(prefill):])  # decode steps carry none
    assert_same(ours, hf_generate(hf, prompt, images))



def test_chat_with_the_hub_template(tiny_gemma3_dir, engine, hf):
    """The model's own template (gemma-3-it style: images where they stand among the texts, the assistant as
    "model") renders OpenAI image parts as transformers' processor renders its messages, and the answer is
    transformers'."""
    from mmserve.tokenizer.chat_template import render_chat

    images = [picture(120, 90, 7), picture(60, 80, 8)]
    _, processor = hf

    def messages(*images: dict) -> list[dict]:
        return [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                {"role": "user", "content": [images[0], {"type": "text", "text": "What is this? "}, images[1]]}]

    prompt = processor.apply_chat_template(messages({"type": "image"}, {"type": "image"}), add_generation_prompt=True)
    bos = processor.tokenizer.bos_token
    assert prompt == (f"{bos}<start_of_turn>user\nBe brief.\n\n{IMAGE}What is this?{IMAGE}<end_of_turn>\n"
                      "<start_of_turn>model\n")
    chat = messages(*({"type": "image_url", "image_url": {"url": image_data_url(img)}} for img in images))
    assert render_chat(engine.tokenizer, chat, engine.chat_template) == prompt
    ref = hf_generate(hf, prompt, images)
    assert engine.chat(chat, GREEDY)["output_ids"] == ref[0]
    assert_same(engine.generate(prompt, GREEDY, return_logits=True, image_data=images), ref)



def test_pan_and_scan_is_refused(engine):
    """Pan-and-scan is off, as transformers' processor has it unless a call asks; asking is refused by name."""
    with pytest.raises(ValueError, match="do_pan_and_scan"):
        engine.generate(f"Look:{IMAGE}", GREEDY, image_data=[picture(200, 60, 2)],
                        mm_processor_kwargs={"do_pan_and_scan": True})


@pytest.fixture(scope="module")
def tiny_gemma3_text_dir(tokenizer_dir, tmp_path_factory):
    """Gemma 3's decoder alone (`Gemma3ForCausalLM`, as Gemma 3 1B): 3 layers, a 4-token window, final logit
    softcapping."""
    import shutil

    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    out = tmp_path_factory.mktemp("tiny_gemma3_text")
    config = Gemma3TextConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
                              sliding_window=4, final_logit_softcapping=5.0, max_position_embeddings=1024,
                              layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                              bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(4321)
    model = Gemma3ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.1 if "norm" in name else 0.2)
    model.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


def test_text_model_matches_transformers(tiny_gemma3_text_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt = "Here is a prompt longer than the window, cut into small chunks: one, two, three, four."
    tok = AutoTokenizer.from_pretrained(tiny_gemma3_text_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_gemma3_text_dir, dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode(prompt)])
    out = model.generate(ids, do_sample=False, max_new_tokens=8, eos_token_id=None, output_logits=True,
                         return_dict_in_generate=True)
    ref = (out.sequences[0, ids.shape[1]:].tolist(), [lg[0] for lg in out.logits])
    with Engine(model_path=str(tiny_gemma3_text_dir), dtype="float32", chunked_prefill_size=8) as e:
        assert_same(e.generate(prompt, GREEDY, return_logits=True), ref)
