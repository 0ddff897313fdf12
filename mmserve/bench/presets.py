"""Model shapes for benchmarks: a folder with a real architecture's config.json and a tokenizer, served with
`--load-format dummy` (random weights), so speed is measured at real sizes without downloading weights.

A vision-language preset's folder also holds what its processor reads (the hub repo's image and video processor
configs) and a tokenizer that knows the family's media tokens: the given tokenizer plus the family's tokens (named as
the family's processor looks them up), with the config's token ids pointed at them and mmserve's chat template of the
family, so mmserve's MultimodalProcessor and transformers' AutoProcessor load the folder offline. Where the given
tokenizer with those tokens outgrows the real vocabulary (LLaVA 1.5's 32,064), the vocabulary grows to hold it."""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

PRESETS: dict[str, dict] = {
    "qwen2.5-0.5b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
        "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "vocab_size": 151936,
        "tie_word_embeddings": True, "hidden_act": "silu", "torch_dtype": "bfloat16",
    },
    # Alibaba-NLP/gte-Qwen2-1.5B-instruct's shape, served as an embedder (the bare decoder, last-token pooling)
    "gte-qwen2-1.5b": {
        "architectures": ["Qwen2Model"], "model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960,
        "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "vocab_size": 151646,
        "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "bfloat16",
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
    # llava-hf/llava-1.5-7b-hf (7.06B parameters, 0.30B of them CLIP ViT-L/14 at 336 px): Vicuna-7B (Llama 2's
    # shape) under 576 image tokens; the vocabulary grows from 32,064 to hold the benchmark's tokenizer
    "llava-1.5-7b": {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "image_token_index": 32000,
        "pad_token_id": 32001, "projector_hidden_act": "gelu", "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default", "tie_word_embeddings": False, "vocab_size": 32064,
        "torch_dtype": "float16",
        "text_config": {
            "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
            "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
            "vocab_size": 32064, "tie_word_embeddings": False, "torch_dtype": "float16",
        },
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
            "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
            "projection_dim": 768, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
        },
    },
    # google/gemma-3-12b-it (12.19B parameters, 0.42B of them the SigLIP tower at 896 px, pooled to 256 tokens):
    # five sliding-window layers (1,024 tokens) to one global; the hub's config leaves most text values at
    # transformers' defaults, written out here
    "gemma-3-12b": {
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "boi_token_index": 255999,
        "eoi_token_index": 256000, "image_token_index": 262144, "mm_tokens_per_image": 256,
        "eos_token_id": [1, 106], "initializer_range": 0.02, "torch_dtype": "bfloat16",
        "text_config": {
            "model_type": "gemma3_text", "hidden_size": 3840, "intermediate_size": 15360, "num_hidden_layers": 48,
            "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256, "query_pre_attn_scalar": 256,
            "sliding_window": 1024, "sliding_window_pattern": 6, "max_position_embeddings": 131072,
            "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "rms_norm_eps": 1e-6,
            "hidden_activation": "gelu_pytorch_tanh", "vocab_size": 262208,
        },
        "vision_config": {
            "model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
            "num_hidden_layers": 27, "num_attention_heads": 16, "image_size": 896, "patch_size": 14,
            "vision_use_head": False, "layer_norm_eps": 1e-6,
        },
    },
    # mistralai/Mistral-Small-3.1-24B-Instruct-2503 in transformers' layout (24.0B parameters, 0.4B of them the
    # Pixtral tower): 14 px patches merged 2x2, images up to 1,540 px on the longest edge
    "mistral-small-3.1-24b": {
        "architectures": ["Mistral3ForConditionalGeneration"], "model_type": "mistral3", "image_token_index": 10,
        "multimodal_projector_bias": False, "projector_hidden_act": "gelu", "spatial_merge_size": 2,
        "vision_feature_layer": -1, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "text_config": {
            "model_type": "mistral", "hidden_size": 5120, "intermediate_size": 32768, "num_hidden_layers": 40,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-5, "rope_theta": 1000000000.0, "sliding_window": None, "hidden_act": "silu",
            "vocab_size": 131072, "tie_word_embeddings": False,
        },
        "vision_config": {
            "model_type": "pixtral", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
            "num_attention_heads": 16, "head_dim": 64, "image_size": 1540, "patch_size": 14, "num_channels": 3,
            "hidden_act": "silu", "rope_theta": 10000.0,
        },
    },
    # OpenGVLab/InternVL3-8B-hf (7.94B parameters, 0.30B of them InternViT-300M at 448 px tiles, pixel-shuffled to
    # 256 tokens a tile): Qwen2.5-7B's shape under the tower
    "internvl3-8b": {
        "architectures": ["InternVLForConditionalGeneration"], "model_type": "internvl", "image_token_id": 151667,
        "image_seq_length": 256, "downsample_ratio": 0.5, "projector_hidden_act": "gelu",
        "vision_feature_layer": -1, "vision_feature_select_strategy": "default", "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "text_config": {
            "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
            "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "use_sliding_window": False, "hidden_act": "silu",
            "vocab_size": 151674, "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151645,
        },
        "vision_config": {
            "model_type": "internvl_vision", "hidden_size": 1024, "intermediate_size": 4096,
            "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": [448, 448], "patch_size": [14, 14],
            "hidden_act": "gelu", "norm_type": "layer_norm", "layer_norm_eps": 1e-6, "attention_bias": True,
            "use_qk_norm": False, "use_mean_pooling": True, "use_absolute_position_embeddings": True,
            "layer_scale_init_value": 0.1,
        },
    },
}

# Qwen/Qwen2.5-VL-32B-Instruct: the 7B's ViT with a wider MLP under a 64-layer, 5,120-wide decoder (issue 19's
# tensor-parallel image workload)
PRESETS["qwen2.5-vl-32b"] = {
    **PRESETS["qwen2.5-vl-7b"], "hidden_size": 5120, "intermediate_size": 27648, "num_hidden_layers": 64,
    "num_attention_heads": 40, "num_key_value_heads": 8, "max_window_layers": 64,
    "vision_config": {**PRESETS["qwen2.5-vl-7b"]["vision_config"], "intermediate_size": 3456, "out_hidden_size": 5120},
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
VISION_PROCESSORS["qwen2.5-vl-32b"] = VISION_PROCESSORS["qwen2.5-vl-7b"]  # the same processor files on the hub

_IMAGENET_MEAN, _IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
_RESCALE = 1 / 255
VISION_PROCESSORS |= {
    # a 336 px center crop of the image resized to 336 on its shorter side; 576 tokens (the class token dropped)
    "llava-1.5-7b": {
        "preprocessor_config.json": {
            "image_processor_type": "CLIPImageProcessor", "processor_class": "LlavaProcessor",
            "size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}, "do_center_crop": True,
            "do_resize": True, "do_rescale": True, "rescale_factor": _RESCALE, "do_normalize": True,
            "do_convert_rgb": True, "resample": 3, "image_mean": _CLIP_MEAN, "image_std": _CLIP_STD},
        "processor_config.json": {
            "processor_class": "LlavaProcessor", "image_token": "<image>", "patch_size": 14,
            "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1},
    },
    # every image resized to 896x896, 256 tokens; pan and scan is off (the hub leaves its settings unset)
    "gemma-3-12b": {
        "preprocessor_config.json": {
            "image_processor_type": "Gemma3ImageProcessor", "processor_class": "Gemma3Processor",
            "size": {"height": 896, "width": 896}, "image_seq_length": 256, "do_resize": True, "do_rescale": True,
            "rescale_factor": _RESCALE, "do_normalize": True, "resample": 2, "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5]},
        "processor_config.json": {"processor_class": "Gemma3Processor", "image_seq_length": 256},
    },
    # images kept at their aspect, shrunk to 1,540 px at most on the longest edge, in 28 px steps (a token each),
    # each row of tokens closed by [IMG_BREAK], the last by [IMG_END]
    "mistral-small-3.1-24b": {
        "preprocessor_config.json": {
            "image_processor_type": "PixtralImageProcessor", "processor_class": "PixtralProcessor",
            "size": {"longest_edge": 1540}, "patch_size": {"height": 14, "width": 14}, "do_resize": True,
            "do_rescale": True, "rescale_factor": _RESCALE, "do_normalize": True, "do_convert_rgb": True,
            "resample": 3, "image_mean": _CLIP_MEAN, "image_std": _CLIP_STD},
        "processor_config.json": {
            "processor_class": "PixtralProcessor", "image_token": "[IMG]", "image_break_token": "[IMG_BREAK]",
            "image_end_token": "[IMG_END]", "patch_size": 14, "spatial_merge_size": 2},
    },
    # 448 px tiles on a grid of 1 to 12 chosen by the image's aspect, plus a thumbnail when there is more than one
    # tile (the processor crops to tiles by default; the hub's file says `crop_to_patches: false`, which the
    # processor's call overrides); 256 tokens a tile
    "internvl3-8b": {
        "preprocessor_config.json": {
            "image_processor_type": "GotOcr2ImageProcessorFast", "processor_class": "InternVLProcessor",
            "size": {"height": 448, "width": 448}, "crop_to_patches": False, "min_patches": 1, "max_patches": 12,
            "do_resize": True, "do_rescale": True, "rescale_factor": _RESCALE, "do_normalize": True,
            "do_convert_rgb": True, "resample": 3, "image_mean": _IMAGENET_MEAN, "image_std": _IMAGENET_STD},
        "video_preprocessor_config.json": {
            "video_processor_type": "InternVLVideoProcessor", "processor_class": "InternVLProcessor",
            "size": {"height": 448, "width": 448}, "do_resize": True, "do_rescale": True,
            "rescale_factor": _RESCALE, "do_normalize": True, "do_convert_rgb": True, "resample": 3,
            "image_mean": _IMAGENET_MEAN, "image_std": _IMAGENET_STD},
        "processor_config.json": {"processor_class": "InternVLProcessor", "image_seq_length": 256},
    },
}

# Qwen's vision tokens, each by the config key that holds its id
QWEN_VISION_TOKENS = {"vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>",
                      "vision_token_id": "<|vision_pad|>", "image_token_id": "<|image_pad|>",
                      "video_token_id": "<|video_pad|>"}


@dataclass(frozen=True)
class VisionTokens:
    """What a vision-language preset's tokenizer adds to the given one: `ids`, the tokens whose ids the config
    holds (by config key); `named`, tokens the family's processor reads as tokenizer attributes (`image_token`);
    `extra`, more tokens its chat template writes; and the mmserve chat template of the family."""

    template: str
    ids: dict[str, str]
    named: dict[str, str] = field(default_factory=dict)
    extra: tuple[str, ...] = ()

    @property
    def unnamed(self) -> list[str]:
        named = set(self.named.values())
        return [t for t in dict.fromkeys([*self.ids.values(), *self.extra]) if t not in named]


_PIXTRAL_TOKENS = ("[IMG_BREAK]", "[IMG_END]", "[INST]", "[/INST]", "<s>")
VISION_TOKENS: dict[str, VisionTokens] = {
    "qwen2.5-vl-7b": VisionTokens("qwen2-vl", QWEN_VISION_TOKENS),
    "qwen2.5-vl-32b": VisionTokens("qwen2-vl", QWEN_VISION_TOKENS),
    "qwen3-vl-30b-a3b": VisionTokens("qwen2-vl", QWEN_VISION_TOKENS),
    "llava-1.5-7b": VisionTokens("vicuna_v1.1", {"image_token_index": "<image>", "pad_token_id": "<pad>"},
                                 named={"image_token": "<image>"}, extra=("<s>",)),
    "gemma-3-12b": VisionTokens(
        "gemma-it", {"boi_token_index": "<start_of_image>", "eoi_token_index": "<end_of_image>",
                     "image_token_index": "<image_soft_token>"},
        named={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
        extra=("<bos>", "<start_of_turn>", "<end_of_turn>")),
    "mistral-small-3.1-24b": VisionTokens("mistral", {"image_token_index": "[IMG]"}, extra=_PIXTRAL_TOKENS),
    "internvl3-8b": VisionTokens(
        "internvl-2-5", {"image_token_id": "<IMG_CONTEXT>"},
        named={"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
               "video_token": "<video>"}, extra=("<|im_start|>", "<|im_end|>")),
}


def write_preset(name: str, tokenizer_dir: Path, out: Path, override: dict | None = None) -> Path:
    """A model folder with the preset's config.json and the given tokenizer's files (and, for a vision-language
    preset, its processor's files and the family's tokens); `override` is merged into the config (nested dicts
    key by key), e.g. fewer layers for a quick run."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    out.mkdir(parents=True, exist_ok=True)
    config = _merged(PRESETS[name], override or {})
    if name in VISION_PROCESSORS:
        ids, size = _write_vision_tokenizer(tokenizer_dir, out, VISION_TOKENS[name])
        config.update({key: i for key, i in ids.items() if key in config})
        _fit_vocab(config, size)
        for file, content in VISION_PROCESSORS[name].items():
            (out / file).write_text(json.dumps(content, indent=1))
    else:
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file() and f.name != "config.json":
                shutil.copy(f, out / f.name)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


def _merged(base: dict, override: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _fit_vocab(config: dict, tokens: int) -> None:
    """Grow the config's vocabulary (top level and text model) to hold `tokens`, a multiple of 64 as checkpoints
    pad theirs; a vocabulary already large enough stays as it is."""
    grown = -(-tokens // 64) * 64
    for holder in (config, config.get("text_config") or {}):
        if "vocab_size" in holder and holder["vocab_size"] < tokens:
            holder["vocab_size"] = grown


def _write_vision_tokenizer(tokenizer_dir: Path, out: Path, tokens: VisionTokens) -> tuple[dict[str, int], int]:
    """Save the tokenizer with the family's tokens added (ids past the tokenizer's own) and its chat template into
    `out`; returns the config's token-id keys with their ids, and the tokenizer's size."""
    from transformers import AutoTokenizer

    from mmserve.tokenizer.chat_template import NAMED_TEMPLATES

    tok = AutoTokenizer.from_pretrained(tokenizer_dir, **({"extra_special_tokens": tokens.named}
                                                          if tokens.named else {}))
    tok.add_special_tokens({"additional_special_tokens": tokens.unnamed})
    tok.chat_template = NAMED_TEMPLATES[tokens.template]
    tok.save_pretrained(out)
    return {key: tok.convert_tokens_to_ids(token) for key, token in tokens.ids.items()}, len(tok)


def add_preset_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", help="Benchmark a real architecture's shape with random weights: writes its "
                        "config beside --tokenizer-dir's files and implies --load-format dummy.")
    parser.add_argument("--tokenizer-dir", help="Tokenizer files for --preset.")
    parser.add_argument("--config-override", metavar="JSON", help="JSON merged into --preset's config (nested "
                        "objects key by key), e.g. '{\"text_config\": {\"num_hidden_layers\": 2}}'.")


def apply_preset(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """With --preset, point --model-path at a fresh folder of that shape and load random weights."""
    if not args.preset:
        return
    if not args.tokenizer_dir:
        parser.error("--preset needs --tokenizer-dir")
    override = json.loads(args.config_override) if getattr(args, "config_override", None) else None
    args.model_path = str(write_preset(args.preset, Path(args.tokenizer_dir), Path(tempfile.mkdtemp()), override))
    args.load_format = "dummy"
