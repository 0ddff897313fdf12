"""Embedding and score models (`Engine.encode`) against transformers on tiny random weights (float32, CPU):
pooled hidden states of AutoModel (last token, mean, CLS as the checkpoint asks) within cosine 1e-5, sequence
classifiers' logits within 1e-4; batched equals one at a time, chunked prefill equals one pass, and the prefix cache
serves what comes before the pooled positions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmserve import Engine

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a land far away, there lived a",
    "Here is a long prompt so that chunked prefill has several chunks to cut: one, two, three, four, "
    "five, six, seven, eight, nine, ten, eleven, twelve.",
]
# kind -> (pooling, normalised) of the embedders in tiny_models.POOLING_MODELS
EMBEDDERS = {"qwen2_embed": ("last", True), "llama_embed_mean": ("mean", True), "mistral_embed_cls": ("cls", False)}
CLASSIFIERS = ["qwen2_cls", "llama_cls", "qwen3_reward"]
PAD = 2  # the tiny configs' pad_token_id


def hf_embedding(model_dir, ids: list[int], pooling: str, normalize: bool) -> torch.Tensor:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = model(torch.tensor([ids])).last_hidden_state[0]
    pooled = {"last": hidden[-1], "mean": hidden.mean(dim=0), "cls": hidden[0]}[pooling]
    return F.normalize(pooled, dim=-1) if normalize else pooled


def hf_scores(model_dir, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def assert_cosine(ours: list[float], ref: torch.Tensor, what: str) -> None:
    ours_t = torch.tensor(ours)
    assert ours_t.shape == ref.shape, what
    cos = F.cosine_similarity(ours_t, ref, dim=0).item()
    assert cos >= 1 - 1e-5, f"{what}: cosine {cos}"
    assert torch.allclose(ours_t, ref, atol=1e-4, rtol=1e-4), f"{what}: max diff {(ours_t - ref).abs().max()}"


@pytest.mark.parametrize("kind", list(EMBEDDERS))
def test_embeddings_match_transformers_batched_and_alone(kind, tiny_pooling_dir, tokenizer):
    path = tiny_pooling_dir(kind)
    pooling, normalize = EMBEDDERS[kind]
    with Engine(model_path=str(path), dtype="float32") as engine:
        assert engine.model_config.is_embedding
        batched = engine.encode(PROMPTS)
        alone = [engine.encode(p) for p in PROMPTS]
        by_ids = engine.encode([tokenizer.encode(p) for p in PROMPTS])
    for prompt, b, a, i in zip(PROMPTS, batched, alone, by_ids, strict=True):
        ids = tokenizer.encode(prompt)
        ref = hf_embedding(path, ids, pooling, normalize)
        assert_cosine(b["embedding"], ref, f"{kind} batched {prompt!r}")
        assert_cosine(a["embedding"], ref, f"{kind} alone {prompt!r}")
        assert_cosine(i["embedding"], ref, f"{kind} token ids {prompt!r}")  # served from the prefix cache
        assert b["meta_info"]["prompt_tokens"] == len(ids)
        if normalize:
            assert abs(torch.tensor(b["embedding"]).norm().item() - 1) < 1e-5


@pytest.mark.parametrize("kind", CLASSIFIERS)
def test_scores_match_transformers(kind, tiny_pooling_dir, tokenizer):
    """Each input's logits over the labels; trailing padding is skipped as transformers skips it."""
    path = tiny_pooling_dir(kind)
    inputs = [tokenizer.encode(p) for p in PROMPTS] + [tokenizer.encode(PROMPTS[0]) + [PAD, PAD]]
    with Engine(model_path=str(path), dtype="float32") as engine:
        got = engine.encode(inputs)
    for ids, out in zip(inputs, got, strict=True):
        ref = hf_scores(path, ids)
        diff = (torch.tensor(out["embedding"]) - ref).abs().max().item()
        assert len(out["embedding"]) == ref.numel() and diff < 1e-4, f"{kind} {ids[-3:]}: {diff}"
    assert got[-1]["embedding"] == pytest.approx(got[0]["embedding"], abs=1e-5)  # the padding changed nothing


@pytest.mark.parametrize("kind", ["llama_embed_mean", "qwen2_cls"])
def test_chunked_prefill_equals_one_pass(kind, tiny_pooling_dir):
    """A mean over a prompt prefilled in 8-token chunks sums every chunk's rows; a last-token score reads the last
    chunk. Same values as one pass."""
    path = tiny_pooling_dir(kind)
    with Engine(model_path=str(path), dtype="float32") as engine:
        whole = engine.encode(PROMPTS)
    with Engine(model_path=str(path), dtype="float32", chunked_prefill_size=8) as engine:
        chunked = engine.encode(PROMPTS)
        assert engine.scheduler.stats.prefill_steps > len(PROMPTS)  # the prompts really were cut
    for w, c in zip(whole, chunked, strict=True):
        assert torch.allclose(torch.tensor(c["embedding"]), torch.tensor(w["embedding"]), atol=1e-5)


def test_prefix_cache_serves_before_the_pooled_token(tiny_pooling_dir):
    """Last-token pooling: a repeated prompt reuses its KV up to the last token, and gives the same vector; mean
    pooling needs every position, so nothing is reused."""
    with Engine(model_path=str(tiny_pooling_dir("qwen2_embed")), dtype="float32") as engine:
        first = engine.encode(PROMPTS[1])
        again = engine.encode(PROMPTS[1])
        assert engine.scheduler.stats.cached_tokens == first["meta_info"]["prompt_tokens"] - 1
    assert torch.allclose(torch.tensor(again["embedding"]), torch.tensor(first["embedding"]), atol=1e-6)
    with Engine(model_path=str(tiny_pooling_dir("llama_embed_mean")), dtype="float32") as engine:
        first = engine.encode(PROMPTS[1])
        again = engine.encode(PROMPTS[1])
        assert engine.scheduler.stats.cached_tokens == 0
    assert torch.allclose(torch.tensor(again["embedding"]), torch.tensor(first["embedding"]), atol=1e-6)


def test_dimensions_and_refusals(tiny_pooling_dir, tiny_model_dir):
    with Engine(model_path=str(tiny_pooling_dir("qwen2_embed")), dtype="float32") as engine:
        full = torch.tensor(engine.encode(PROMPTS[0])["embedding"])
        short = torch.tensor(engine.encode(PROMPTS[0], dimensions=16)["embedding"])
        assert short.shape == (16,) and abs(short.norm().item() - 1) < 1e-6
        assert torch.allclose(short, F.normalize(full[:16], dim=0), atol=1e-6)
        with pytest.raises(ValueError, match="dimensions must be"):
            engine.encode(PROMPTS[0], dimensions=65)
        with pytest.raises(ValueError, match="use encode"):
            engine.generate(PROMPTS[0], {"max_new_tokens": 2})
        with pytest.raises(ValueError, match="non-empty"):
            engine.encode([[]])
        assert engine.encode("still serving")["embedding"]
    with Engine(model_path=str(tiny_model_dir("qwen2")), dtype="float32") as engine:
        assert not engine.model_config.is_embedding
        with pytest.raises(ValueError, match="is_embedding=True"):
            engine.encode(PROMPTS[0])


def test_is_embedding_on_a_causal_checkpoint(tiny_model_dir, tokenizer):
    """--is-embedding on a *ForCausalLM checkpoint serves its decoder without the LM head: last-token hidden
    states, normalised, as AutoModel gives them."""
    path = tiny_model_dir("qwen3")
    with Engine(model_path=str(path), dtype="float32", is_embedding=True) as engine:
        assert type(engine.runner.model).__name__ == "Qwen3Model"
        out = engine.encode(PROMPTS[2])
    assert_cosine(out["embedding"], hf_embedding(path, tokenizer.encode(PROMPTS[2]), "last", True), "qwen3")


def test_tensor_parallel_scores_equal_one_rank(tiny_pooling_dir):
    """Two ranks (gloo on the CPU): every rank pools the same gathered hidden states, the same scores as one."""
    path = tiny_pooling_dir("llama_cls")
    with Engine(model_path=str(path), dtype="float32", device="cpu", tp_size=2, chunked_prefill_size=8) as engine:
        split = engine.encode(PROMPTS)
    with Engine(model_path=str(path), dtype="float32") as engine:
        whole = engine.encode(PROMPTS)
    for s, w in zip(split, whole, strict=True):
        assert torch.allclose(torch.tensor(s["embedding"]), torch.tensor(w["embedding"]), atol=1e-4)
