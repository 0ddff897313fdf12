"""Tiny random-weight models of real architectures, built with transformers and saved in Hugging Face layout
with SmolLM2's tokenizer (used by the fixture `tiny_model_dir` and by tests that iterate over families)."""

from __future__ import annotations

from pathlib import Path

import torch


def _tiny_configs():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2, initializer_range=0.2)
    return {
        # llama3 rope scaling and untied embeddings; saved in several shards with an index
        "llama": lambda: LlamaConfig(**common, tie_word_embeddings=False, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        # a sliding window shorter than the prompts, so the window is exercised
        "mistral": lambda: MistralConfig(**common, sliding_window=8, tie_word_embeddings=False),
        # q/k/v biases and tied embeddings
        "qwen2": lambda: Qwen2Config(**common, tie_word_embeddings=True),
        # per-head q/k norms and a head_dim different from hidden / heads
        "qwen3": lambda: Qwen3Config(**common, head_dim=32, tie_word_embeddings=True),
    }


TINY_FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


def build_tiny_model(family: str, tokenizer_dir: Path, out: Path) -> Path:
    """Save a 2-layer random model of `family` with SmolLM2's tokenizer in Hugging Face layout."""
    import shutil

    from transformers import AutoModelForCausalLM

    torch.manual_seed(1234 + TINY_FAMILIES.index(family))
    config = _tiny_configs()[family]()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger random weights than the default init, so greedy choices are clear-cut
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.2)
    model.save_pretrained(out, max_shard_size="1MB" if family == "llama" else "100MB")
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


