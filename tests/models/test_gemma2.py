"""Gemma 2 against transformers on tiny random weights (float32, CPU, eager attention): the reward model's scores
within 1e-4 (batched, alone, after padding, in prefill chunks), and the causal LM's greedy tokens and every step's
logits within 1e-4, with caps small enough to bend both attention scores and logits, and a sliding window shorter
than the prompts."""

from __future__ import annotations

import pytest
import torch

from mmserve import Engine
from mmserve.attention.base import bind_attention
from mmserve.attention.torch_backend import TorchAttentionBackend
from mmserve.models.gemma2 import Gemma2ForCausalLM

PROMPTS = [
    "The capital of France is",
    "Here is a longer prompt, so that the sliding window of six tokens leaves its first words behind: one, two, "
    "three, four.",
]
PAD = 2
GREEDY = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}


def test_reward_scores_match_transformers(tiny_gemma2_dir, tokenizer):
    from transformers import AutoModelForSequenceClassification

    path = tiny_gemma2_dir("Gemma2ForSequenceClassification")
    inputs = [tokenizer.encode(p) for p in PROMPTS] + [tokenizer.encode(PROMPTS[0]) + [PAD, PAD]]
    with Engine(model_path=str(path), dtype="float32") as engine:
        assert engine.model_config.is_embedding
        batched = engine.encode(inputs)
        alone = [engine.encode(ids) for ids in inputs]
    with Engine(model_path=str(path), dtype="float32", chunked_prefill_size=8) as engine:
        chunked = engine.encode(inputs)
        assert engine.scheduler.stats.prefill_steps > len(inputs)  # the long prompt really was cut
    hf = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    for ids, b, a, c in zip(inputs, batched, alone, chunked, strict=True):
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0]
        for name, out in (("batched", b), ("alone", a), ("chunked", c)):
            got = torch.tensor(out["embedding"])
            assert got.shape == ref.shape and (got - ref).abs().max().item() < 1e-4, f"{name} {ids[-3:]}"
    assert batched[-1]["embedding"] == pytest.approx(batched[0]["embedding"], abs=1e-5)  # padding skipped


def test_causal_lm_matches_transformers(tiny_gemma2_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    path = tiny_gemma2_dir("Gemma2ForCausalLM")
    with Engine(model_path=str(path), dtype="float32") as engine:
        ours = engine.generate(PROMPTS, GREEDY, return_logits=True)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    for prompt, got in zip(PROMPTS, ours, strict=True):
        ids = torch.tensor([tokenizer.encode(prompt)])
        ref = hf.generate(ids, do_sample=False, max_new_tokens=8, eos_token_id=None, output_logits=True,
                          return_dict_in_generate=True)
        assert got["output_ids"] == ref.sequences[0, ids.shape[1]:].tolist()
        for step, (a, b) in enumerate(zip(got["meta_info"]["logits"], ref.logits, strict=True)):
            assert (a - b[0]).abs().max().item() < 1e-4, f"{prompt[:20]!r} step {step}"


def test_backend_without_logit_cap_refuses(tiny_gemma2_dir):
    from transformers import AutoConfig

    class Uncapped(TorchAttentionBackend):
        supports_logit_cap = False

    model = Gemma2ForCausalLM(AutoConfig.from_pretrained(tiny_gemma2_dir("Gemma2ForCausalLM")))
    with pytest.raises(ValueError, match="attn_logit_softcapping.*--attention-backend torch"):
        bind_attention(model, Uncapped())


def test_causal_checkpoint_as_embedder(tiny_gemma2_dir, tokenizer):
    """--is-embedding on Gemma2ForCausalLM: the final normed hidden state of the last token, L2-normalised, as
    AutoModel gives it (the logit cap belongs to the LM head, which an embedder skips)."""
    import torch.nn.functional as F
    from transformers import AutoModel

    path = tiny_gemma2_dir("Gemma2ForCausalLM")
    with Engine(model_path=str(path), dtype="float32", is_embedding=True) as engine:
        got = torch.tensor(engine.encode(PROMPTS[1])["embedding"])
    model = AutoModel.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = F.normalize(model(torch.tensor([tokenizer.encode(PROMPTS[1])])).last_hidden_state[0, -1], dim=0)
    assert F.cosine_similarity(got, ref, dim=0).item() >= 1 - 1e-5
