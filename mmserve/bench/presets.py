"""Model shapes for benchmarks: a folder with a real architecture's config.json and a tokenizer, served with
`--load-format dummy` (random weights), so speed is measured at real sizes without downloading weights.

A vision-language preset's folder also holds what its processor reads (the hub repo's image and video processor
configs) and a tokenizer that knows the family's media tokens: the given tokenizer plus Qwen's vision tokens, with
the config's token ids pointed at them and mmserve's `qwen2-vl` chat template, so mmserve's MultimodalProcessor and
transformers' AutoProcessor load the folder offline."""

from __future__ import annotations

import argparse
import copy
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
    # Qwen/Qwen2.5-VL-7B-Instruct (8.29B parameters, 0.68B of them the ViT); the hub's flat layout
    "qwen2.5-vl-7b": {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl", "hidden_size": 3584,
        "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
        "max_position_embeddings": 128000, "max_window_layers": 28, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "sliding_window": 32768,
        "use_sliding_window": False, "vocab_size": 152064, "tie_word_embeddings": False, "hidden_act": "silu",
        "torch_dtype": "bfloat16", "bos_token_id": 151643, "eos_token_id": 151645,
        "vision_start_token_id": 151652, "vision_end_token_id": 151653, "vision_token_id": 151654,
        "image_token_id": 151655, "video_token_id": 151656,
        "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                          "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                          "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                          "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
    },
    # Qwen/Qwen3-VL-30B-A3B-Instruct (31.1B parameters, 0.54B of them the ViT): qwen3-30b-a3b's experts under a
    # ViT of 16 px patches with DeepStack
    "qwen3-vl-30b-a3b": {
        "architectures": ["Qwen3VLMoeForConditionalGeneration"], "model_type": "qwen3_vl_moe",
        "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653, "tie_word_embeddings": False,
        "text_config": {
            "model_type": "qwen3_vl_moe_text", "hidden_size": 2048, "intermediate_size": 6144,
            "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True,
            "decoder_sparse_step": 1, "mlp_only_layers": [], "num_hidden_layers": 48, "num_attention_heads": 32,
            "num_key_value_heads": 4, "head_dim": 128, "max_position_embeddings": 262144, "rms_norm_eps": 1e-6,
            "rope_theta": 5000000, "rope_scaling": {"rope_type": "default", "mrope_section": [24, 20, 20],
                                                    "mrope_interleaved": True},
            "attention_bias": False, "hidden_act": "silu", "vocab_size": 151936, "bos_token_id": 151643,
            "eos_token_id": 151645, "dtype": "bfloat16",
        },
        "vision_config": {
            "model_type": "qwen3_vl_moe", "depth": 27, "hidden_act": "gelu_pytorch_tanh", "hidden_size": 1152,
            "intermediate_size": 4304, "num_heads": 16, "in_channels": 3, "num_position_embeddings": 2304,
            "out_hidden_size": 2048, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
            "deepstack_visual_indexes": [8, 16, 24],
        },
    },
}

_CLIP_MEAN, _CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
# The processor files of the vision-language presets, with their hub repos' values: Qwen2.5-VL resizes images to
# 3,136..12,845,056 pixels and video frames to 100,352..602,112 (transformers' defaults; the repo ships no video
# config), in 28 px steps; Qwen3-VL to 65,536..16,777,216 pixels an image and 4,096..25,165,824 a video (all
# frames together), in 32 px steps.
VISION_PROCESSORS: dict[str, dict[str, dict]] = {
    "qwen2.5-vl-7b": {
        "preprocessor_config.json": {
            "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
            "size": {"shortest_edge": 3136, "longest_edge": 12845056}, "patch_size": 14, "temporal_patch_size": 2,
            "merge_size": 2, "image_mean": _CLIP_MEAN, "image_std": _CLIP_STD},
        "video_preprocessor_config.json": {
            "video_processor_type": "Qwen2VLVideoProcessor", "processor_class": "Qwen2_5_VLProcessor",
            "size": {"shortest_edge": 128 * 28 * 28, "longest_edge": 768 * 28 * 28}, "patch_size": 14,
            "temporal_patch_size": 2, "merge_size": 2, "image_mean": _CLIP_MEAN, "image_std": _CLIP_STD},
    },
    "qwen3-vl-30b-a3b": {
        "preprocessor_config.json": {
            "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen3VLProcessor",
            "size": {"shortest_edge": 65536, "longest_edge": 16777216}, "patch_size": 16, "temporal_patch_size": 2,
            "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
        "video_preprocessor_config.json": {
            "video_processor_type": "Qwen3VLVideoProcessor", "processor_class": "Qwen3VLProcessor",
            "size": {"shortest_edge": 4096, "longest_edge": 25165824}, "patch_size": 16, "temporal_patch_size": 2,
            "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
    },
}

# Qwen's vision tokens, each by the config key that holds its id
QWEN_VISION_TOKENS = {"vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>",
                      "vision_token_id": "<|vision_pad|>", "image_token_id": "<|image_pad|>",
                      "video_token_id": "<|video_pad|>"}


def write_preset(name: str, tokenizer_dir: Path, out: Path) -> Path:
    """A model folder with the preset's config.json and the given tokenizer's files (and, for a vision-language
    preset, its processor's files and the vision tokens)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    out.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(PRESETS[name])
    if name in VISION_PROCESSORS:
        ids = _write_vision_tokenizer(tokenizer_dir, out)
        config.update({key: i for key, i in ids.items() if key in config})
        for file, content in VISION_PROCESSORS[name].items():
            (out / file).write_text(json.dumps(content, indent=1))
    else:
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file() and f.name != "config.json":
                shutil.copy(f, out / f.name)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


def _write_vision_tokenizer(tokenizer_dir: Path, out: Path) -> dict[str, int]:
    """Save the tokenizer with Qwen's vision tokens added (ids past the tokenizer's own, inside the preset's
    vocabulary) and the `qwen2-vl` chat template into `out`; returns the config's token-id keys and their ids."""
    from transformers import AutoTokenizer

    from mmserve.tokenizer.chat_template import NAMED_TEMPLATES

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": list(QWEN_VISION_TOKENS.values())})
    tok.chat_template = NAMED_TEMPLATES["qwen2-vl"]
    tok.save_pretrained(out)
    return {key: tok.convert_tokens_to_ids(token) for key, token in QWEN_VISION_TOKENS.items()}


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
