"""logit_bias and min_new_tokens end to end on a tiny model, against transformers' `generate(sequence_bias=...,
min_new_tokens=...)`, and the request's stop checks while min_new_tokens holds it back."""

from __future__ import annotations

import pytest
import torch

from mmserve.sampling_params import SamplingParams
from mmserve.scheduler.req import Req
from mmserve.tokenizer.detokenizer import IncrementalDetokenizer

EOS = 2  # tests/tiny_models.py
GREEDY = {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True}
PROMPT = "The cat sat on the mat and then"


@pytest.fixture(scope="module")
def hf(model_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)


def _hf_generate(hf, engine, prompt: str, **kwargs) -> list[int]:
    ids = torch.tensor([engine.tokenizer.encode(prompt)])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, **kwargs)
    return out[0, ids.shape[1]:].tolist()


def test_logit_bias_matches_transformers_sequence_bias(engine, hf):
    base = engine.generate(PROMPT, GREEDY)["output_ids"]
    bias = {base[0]: -100.0, base[3]: -7.5, 1234: 6.0, 777: 3.0}
    out = engine.generate(PROMPT, {**GREEDY, "logit_bias": {str(t): b for t, b in bias.items()}})
    ref = _hf_generate(hf, engine, PROMPT, max_new_tokens=10, eos_token_id=None,
                       sequence_bias={(t,): b for t, b in bias.items()})
    assert out["output_ids"] == ref
    assert out["output_ids"] != base and base[0] not in out["output_ids"]


def test_logit_bias_with_repetition_penalty_matches_transformers(engine, hf):
    bias = {1234: 4.0, 99: -2.0}
    out = engine.generate(PROMPT, {**GREEDY, "repetition_penalty": 1.4, "logit_bias": bias})
    ref = _hf_generate(hf, engine, PROMPT, max_new_tokens=10, eos_token_id=None, repetition_penalty=1.4,
                       sequence_bias={(t,): b for t, b in bias.items()})
    assert out["output_ids"] == ref


def test_min_new_tokens_holds_back_eos_like_transformers(engine, hf):
    params = {"temperature": 0, "max_new_tokens": 10, "logit_bias": {str(EOS): 60}}
    eager = engine.generate(PROMPT, params)
    assert eager["output_ids"] == [EOS]  # the bias makes EOS the first choice
    held = engine.generate(PROMPT, {**params, "min_new_tokens": 4})
    ref = _hf_generate(hf, engine, PROMPT, max_new_tokens=10, eos_token_id=EOS, min_new_tokens=4,
                       sequence_bias={(EOS,): 60.0})
    assert held["output_ids"] == ref and len(ref) == 5 and ref[-1] == EOS
    assert held["meta_info"]["finish_reason"] == {"type": "stop", "matched": EOS}


def test_min_new_tokens_holds_back_stop_token_ids_like_transformers(engine, hf):
    base = engine.generate(PROMPT, GREEDY)["output_ids"]
    stop = base[1]
    held = engine.generate(PROMPT, {**GREEDY, "stop_token_ids": [stop], "min_new_tokens": 3})
    ref = _hf_generate(hf, engine, PROMPT, max_new_tokens=10, eos_token_id=[stop], min_new_tokens=3)
    assert held["output_ids"] == ref and stop not in ref[:3]


def test_out_of_vocabulary_logit_bias_is_refused(engine):
    vocab = engine.model_config.vocab_size
    with pytest.raises(ValueError, match=f"logit_bias key '{vocab}' is outside the vocabulary"):
        engine.generate("x", {"logit_bias": {str(vocab): 1}})
    assert engine.generate("still alive", GREEDY)["meta_info"]["completion_tokens"] == 10


# ----- the request's stop checks -----


def _req(tokenizer, **params) -> Req:
    p = SamplingParams.from_dict(params)
    req = Req("r", [1, 2, 3], p, eos_token_ids={EOS}, max_total_len=1000)
    if p.stop:
        req.stop_detokenizer = IncrementalDetokenizer(tokenizer, True, True, prompt_ids=[1, 2, 3])
    return req


def test_held_back_request_ignores_eos_stop_ids_and_stop_strings(tokenizer):
    words = tokenizer.encode(" apple pie apple tart", add_special_tokens=False)
    assert len(words) == 4
    req = _req(tokenizer, min_new_tokens=3, stop=["apple"], stop_token_ids=[words[1]], max_new_tokens=10)
    assert req.stop_ids(len(tokenizer)) == sorted({EOS, words[1]})
    req.append_token(words[0])  # " apple": a stop string, but only 1 of 3 tokens are out
    req.append_token(EOS)  # the sampler masks it; should it come anyway, it does not end the request
    assert not req.finished
    req.append_token(words[1])  # 3 tokens out: a stop id now counts
    assert req.finished_reason == {"type": "stop", "matched": words[1]}
    assert req.stop_ids(len(tokenizer)) == []

    req = _req(tokenizer, min_new_tokens=2, stop=["apple"], max_new_tokens=10)
    for t in words[:2]:  # " apple pie": the stop string ended before min_new_tokens
        req.append_token(t)
    assert not req.finished
    req.append_token(words[2])  # " apple" again, past min_new_tokens
    assert req.finished_reason == {"type": "stop", "matched": "apple"}


def test_length_still_ends_a_held_back_request(tokenizer):
    req = _req(tokenizer, min_new_tokens=2, max_new_tokens=2)
    req.append_token(5)
    req.append_token(6)
    assert req.finished_reason == {"type": "length", "length": 2}
    req = Req("r", [1], SamplingParams.from_dict({"min_new_tokens": 5}), {EOS}, max_total_len=3)
    req.append_token(5)
    req.append_token(6)
    assert req.finished_reason == {"type": "length", "length": 2}  # the context is full


def _repeated_piece(engine) -> tuple[list[int], str, int]:
    """A greedy output in which some token's text comes back later: (ids, that text, index of its first use)."""
    ids = engine.generate(PROMPT, {**GREEDY, "max_new_tokens": 20})["output_ids"]
    pieces = [engine.tokenizer.decode([t]) for t in ids]
    for i, piece in enumerate(pieces):
        if len(piece.strip()) >= 4 and piece in pieces[i + 1:]:
            return ids, piece, i
    pytest.skip("no repeated token in this model's greedy output")


def test_stop_string_before_min_new_tokens_does_not_end_the_request(engine):
    ids, piece, first = _repeated_piece(engine)
    second = ids.index(ids[first], first + 1)
    out = engine.generate(PROMPT, {**GREEDY, "max_new_tokens": 20, "stop": [piece], "min_new_tokens": first + 2})
    assert out["output_ids"] == ids[: second + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": piece}


def test_text_is_cut_at_the_stop_string_that_ended_the_request(engine):
    ids, piece, first = _repeated_piece(engine)
    second = ids.index(ids[first], first + 1)
    out = engine.generate(PROMPT, {**GREEDY, "max_new_tokens": 20, "stop": [piece], "min_new_tokens": first + 2})
    full = engine.tokenizer.decode(ids[: second + 1])
    assert out["text"] == full[: full.rindex(piece)]
    streamed = engine.generate(PROMPT, {**GREEDY, "max_new_tokens": 20, "stop": [piece],
                                        "min_new_tokens": first + 2}, stream=True)
    assert "".join(chunk["text"] for chunk in streamed) == out["text"]
