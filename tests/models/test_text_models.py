"""Every text family against Hugging Face transformers on tiny random weights (float32, CPU): the same
greedy tokens and next-token logits within 1e-4, alone, batched, with tiny prefill chunks, and after
retractions forced by a small KV cache."""

from __future__ import annotations

import pytest
import torch
from tiny_models import TINY_FAMILIES

from mmserve import Engine

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a land far away, there lived a",
    "Here is a long prompt so that chunked prefill has several chunks to cut: one, two, three, four, "
    "five, six, seven, eight, nine, ten, eleven, twelve.",
]
NEW_TOKENS = 10
ATOL = 1e-4

_REFERENCE: dict[tuple[str, str, int], tuple[list[int], list[torch.Tensor]]] = {}


def hf_reference(model_dir, prompt: str, new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' greedy tokens and raw next-token logits for one prompt (no padding), cached."""
    key = (str(model_dir), prompt, new_tokens)
    if key not in _REFERENCE:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        ids = torch.tensor([tok.encode(prompt)])
        out = model.generate(ids, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=0,
                             eos_token_id=None, output_logits=True, return_dict_in_generate=True)
        _REFERENCE[key] = (out.sequences[0, ids.shape[1]:].tolist(), [lg[0] for lg in out.logits])
    return _REFERENCE[key]


def assert_matches_hf(model_dir, prompts, outputs, new_tokens):
    for prompt, out in zip(prompts, outputs, strict=True):
        ref_ids, ref_logits = hf_reference(model_dir, prompt, new_tokens)
        assert out["output_ids"] == ref_ids, prompt
        ours = out["meta_info"]["logits"]
        assert len(ours) == len(ref_ids)
        for step, (a, b) in enumerate(zip(ours, ref_logits, strict=True)):
            diff = (a - b).abs().max().item()
            assert diff < ATOL, f"step {step} of {prompt!r}: max abs logit diff {diff}"


def run(engine: Engine, prompts, new_tokens=NEW_TOKENS, **params):
    sampling = {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True, **params}
    return engine.generate(prompts, sampling, return_logits=True)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_greedy_matches_transformers_alone_and_batched(family, tiny_model_dir):
    path = tiny_model_dir(family)
    with Engine(model_path=str(path), dtype="float32") as engine:
        assert engine.model_config.dtype == torch.float32
        for prompt in PROMPTS:
            assert_matches_hf(path, [prompt], [run(engine, prompt)], NEW_TOKENS)
        assert_matches_hf(path, PROMPTS, run(engine, PROMPTS), NEW_TOKENS)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_chunked_prefill_matches_transformers(family, tiny_model_dir):
    path = tiny_model_dir(family)
    with Engine(model_path=str(path), dtype="float32", chunked_prefill_size=16, disable_radix_cache=True) as engine:
        outputs = run(engine, PROMPTS)
        assert engine.scheduler.stats.prefill_steps > 3  # the long prompt took several chunks
    assert_matches_hf(path, PROMPTS, outputs, NEW_TOKENS)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_retraction_keeps_outputs(family, tiny_model_dir):
    path = tiny_model_dir(family)
    prompts = [f"Story number {i}: the dragon and the knight went" for i in range(4)]
    new_tokens = 30
    with Engine(model_path=str(path), dtype="float32", max_total_tokens=64) as engine:
        outputs = run(engine, prompts, new_tokens)
        assert engine.scheduler.stats.retractions > 0
    assert_matches_hf(path, prompts, outputs, new_tokens)
