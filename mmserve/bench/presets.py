"""Model shapes for benchmarks: a folder with a real architecture's config.json and a tokenizer, served with
`--load-format dummy` (random weights), so speed is measured at real sizes without downloading weights."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

PRESETS: dict[str, dict] = {
    "qwen2.5-0.5b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
        "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "vocab_size": 151936,
        "tie_word_embeddings": True, "hidden_act": "silu", "torch_dtype": "bfloat16",
    },
    "llama-3.2-1b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
        "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 64, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "vocab_size": 128256,
        "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "tie_word_embeddings": True, "hidden_act": "silu", "torch_dtype": "bfloat16",
    },
    "llama-3.1-8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "vocab_size": 128256, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "bfloat16",
    },
    # mixture of experts: 128 experts of width 768, 8 per token (about 3B of 30B parameters active)
    "qwen3-30b-a3b": {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
        "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
        "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [], "num_hidden_layers": 48,
        "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "vocab_size": 151936, "tie_word_embeddings": False,
        "hidden_act": "silu", "torch_dtype": "bfloat16",
    },
}


def write_preset(name: str, tokenizer_dir: Path, out: Path) -> Path:
    """A model folder with the preset's config.json and the given tokenizer's files."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(PRESETS[name], indent=1))
    for f in Path(tokenizer_dir).iterdir():
        if f.is_file() and f.name != "config.json":
            shutil.copy(f, out / f.name)
    return out


def add_preset_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", help="Benchmark a real architecture's shape with random weights: writes its "
                        "config beside --tokenizer-dir's files and implies --load-format dummy.")
    parser.add_argument("--tokenizer-dir", help="Tokenizer files for --preset.")


def apply_preset(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """With --preset, point --model-path at a fresh folder of that shape and load random weights."""
    if not args.preset:
        return
    if not args.tokenizer_dir:
        parser.error("--preset needs --tokenizer-dir")
    args.model_path = str(write_preset(args.preset, Path(args.tokenizer_dir), Path(tempfile.mkdtemp())))
    args.load_format = "dummy"
