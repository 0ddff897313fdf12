"""Model shapes for benchmarks: a folder with a real architecture's config.json and a tokenizer, served with
`--load-format dummy` (random weights), so speed is measured at real sizes without downloading weights.

A vision-language preset's folder also holds what its processor reads (the hub repo's image and video processor
configs) and a tokenizer that knows the family's media tokens: the given tokenizer plus the family's tokens (named as
the family's processor looks them up), with the config's token ids pointed at them and mmserve's chat template of the
family, so mmserve's MultimodalProcessor and transformers' AutoProcessor load the folder offline. Where the given
tokenizer with those tokens outgrows the real vocabulary (LLaVA 1.5's 32,064), the vocabulary grows to hold it.

A preset keeps its checkpoint's real shape even where that outgrows one GPU (GLM-4.5V's 108B parameters); a run cuts
it down with `--config-override`, e.g. fewer layers."""

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

# Issue 20's families. No hub access here: shapes are transformers' config classes (whose defaults name these
# checkpoints) and the hub configs as recalled; values that are not sure are marked so (none changes the compute).
_GLM_VISION = {"depth": 24, "hidden_size": 1536, "num_heads": 12, "intermediate_size": 13696, "out_hidden_size": 4096,
               "patch_size": 14, "image_size": 336, "spatial_merge_size": 2, "temporal_patch_size": 2,
               "in_channels": 3, "hidden_act": "silu", "rms_norm_eps": 1e-5, "attention_bias": False}
_GLM_IDS = {"image_token_id": 151343, "video_token_id": 151344, "image_start_token_id": 151339,
            "image_end_token_id": 151340, "video_start_token_id": 151341, "video_end_token_id": 151342}
# Phi-4-mini's LongRoPE factors, one per rotary pair (96 of each 128-dim head); the hub's short factors are taken to
# equal its long ones (not sure; prompts here stay under the 4,096 positions where the short ones apply)
_PHI4_ROPE_FACTORS = [
    1, 1.118320672, 1.250641126, 1.398617824, 1.564103225, 1.74916897, 1.956131817, 2.187582649, 2.446418898,
    2.735880826, 3.059592084, 3.421605075, 3.826451687, 4.279200023, 4.785517845, 5.351743533, 5.984965424,
    6.693110555, 7.485043894, 8.370679318, 9.36110372, 10.4687158, 11.70738129, 13.09260651, 14.64173252,
    16.37415215, 18.31155283, 20.47818807, 22.90118105, 25.61086418, 28.64115884, 32.03, 32.1, 32.13, 32.23, 32.6,
    32.61, 32.64, 32.66, 32.7, 32.71, 32.93, 32.97, 33.28, 33.49, 33.5, 44.16, 47.77]
PRESETS |= {
    # zai-org/GLM-4.1V-9B-Thinking (Glm4vConfig's defaults; 10.3B parameters, 0.9B of them the ViT): GLM-4-9B's
    # decoder (2 KV heads, a qkv bias, rotary on half of each head over M-RoPE bands) under a 24-block ViT of 14 px
    # patches merged 2x2; the hub's max_position_embeddings (65,536) recalled
    "glm-4.1v-9b": {
        "architectures": ["Glm4vForConditionalGeneration"], "model_type": "glm4v", **_GLM_IDS,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "text_config": {
            "model_type": "glm4v_text", "vocab_size": 151552, "hidden_size": 4096, "intermediate_size": 13696,
            "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 2, "attention_bias": True,
            "max_position_embeddings": 65536, "rms_norm_eps": 1e-5, "hidden_act": "silu", "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5, "rope_scaling": {"rope_type": "default", "mrope_section": [8, 12, 12]},
            "pad_token_id": 151329, "eos_token_id": [151329, 151336, 151338], "torch_dtype": "bfloat16",
        },
        "vision_config": {"model_type": "glm4v", **_GLM_VISION},
    },
    # zai-org/GLM-4.5V (Glm4vMoeConfig's defaults; 108B parameters, 12B active): GLM-4.5-Air's 46 layers (the first
    # dense, then 128 experts of width 1,408, 8 per token, and a shared one; 96 query heads of 128 over 8 KV heads)
    # under GLM-4.1V's ViT with a 10,944-wide merger. 216 GB in bf16: one 80 GB GPU runs it with fewer layers, e.g.
    # --config-override '{"text_config": {"num_hidden_layers": 12}}' (28B, 52 GiB). The vocabulary (151,552;
    # transformers' default 151,424) is recalled.
    "glm-4.5v": {
        "architectures": ["Glm4vMoeForConditionalGeneration"], "model_type": "glm4v_moe",
        **_GLM_IDS, "image_token_id": 151363, "video_token_id": 151364, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "text_config": {
            "model_type": "glm4v_moe_text", "vocab_size": 151552, "hidden_size": 4096, "intermediate_size": 10944,
            "moe_intermediate_size": 1408, "num_hidden_layers": 46, "num_attention_heads": 96,
            "num_key_value_heads": 8, "head_dim": 128, "n_routed_experts": 128, "n_shared_experts": 1,
            "num_experts_per_tok": 8, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
            "routed_scaling_factor": 1.0, "norm_topk_prob": True, "attention_bias": True, "use_qk_norm": False,
            "max_position_embeddings": 65536, "rms_norm_eps": 1e-5, "hidden_act": "silu", "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5, "rope_scaling": {"rope_type": "default", "mrope_section": [8, 12, 12]},
            "pad_token_id": 151329, "eos_token_id": [151329, 151336, 151338], "torch_dtype": "bfloat16",
        },
        "vision_config": {"model_type": "glm4v_moe", **_GLM_VISION, "intermediate_size": 10944},
    },
    # meta-llama/Llama-3.2-11B-Vision-Instruct (MllamaConfig's defaults; 10.7B parameters): Llama 3.1 8B's 32
    # layers with 8 gated cross-attention layers among them (40 in all) reading a 32+8-layer ViT over up to 4 tiles
    # of 560 px (1,601 states a tile); an image is one <|image|> token in the text
    "llama-3.2-11b-vision": {
        "architectures": ["MllamaForConditionalGeneration"], "model_type": "mllama", "image_token_index": 128256,
        "torch_dtype": "bfloat16",
        "text_config": {
            "model_type": "mllama_text_model", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 40, "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38],
            "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-5, "hidden_act": "silu", "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192},
            "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "pad_token_id": 128004,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        },
        "vision_config": {
            "model_type": "mllama_vision_model", "hidden_size": 1280, "intermediate_size": 5120,
            "num_hidden_layers": 32, "num_global_layers": 8, "attention_heads": 16, "image_size": 560,
            "patch_size": 14, "num_channels": 3, "max_num_tiles": 4, "vision_output_dim": 7680,
            "intermediate_layers_indices": [3, 7, 15, 23, 30], "hidden_act": "gelu", "norm_eps": 1e-5,
            "supported_aspect_ratios": [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
        },
    },
    # microsoft/Phi-4-multimodal-instruct in transformers' layout (4.7B parameters; 5.6B on the hub with its vision
    # and speech LoRA adapters, which transformers' class leaves out): Phi-4-mini (24 query heads over 8 KV heads,
    # tied embeddings, LongRoPE on 3/4 of each head) under a SigLIP-400M tower over 448 px crops, and a 24-block
    # Conformer audio encoder (Phi4MultimodalConfig's defaults, but for its 32 query heads: Phi-4-mini has 24)
    "phi-4-multimodal": {
        "architectures": ["Phi4MultimodalForCausalLM"], "model_type": "phi4_multimodal", "vocab_size": 200064,
        "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 24,
        "num_key_value_heads": 8, "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": True, "rope_theta": 10000.0,
        "partial_rotary_factor": 0.75, "rope_scaling": {"rope_type": "longrope", "short_factor": _PHI4_ROPE_FACTORS,
                                                        "long_factor": _PHI4_ROPE_FACTORS},
        "bos_token_id": 199999, "eos_token_id": [199999, 200020], "pad_token_id": 199999, "torch_dtype": "bfloat16",
        "vision_config": {
            "model_type": "phi4_multimodal_vision", "hidden_size": 1152, "intermediate_size": 4304,
            "num_hidden_layers": 27, "num_attention_heads": 16, "image_size": 448, "patch_size": 14,
            "crop_size": 448, "feature_layer": -2, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
            "image_token_id": 200010,
        },
        "audio_config": {
            "model_type": "phi4_multimodal_audio", "hidden_size": 1024, "intermediate_size": 1536, "num_blocks": 24,
            "num_attention_heads": 16, "input_size": 80, "time_reduction": 8, "chunk_size": -1, "left_chunk": 18,
            "nemo_conv_channels": 1024, "ext_pw_out_channel": 1024, "depthwise_separable_out_channel": 1024,
            "bias_max_distance": 1000, "audio_token_id": 200011,
        },
    },
    # Qwen/Qwen3-Omni-30B-A3B-Instruct's thinker (31.7B parameters; its config.json's `thinker_config` as recalled,
    # as Qwen3OmniMoeThinkerConfig's defaults are partly placeholders, e.g. a 3,584-token vocabulary; the talker and
    # the code2wav vocoder, which only speak, are left out): qwen3-30b-a3b's experts under Qwen3-VL's ViT (16 px
    # patches, DeepStack) and a 32-layer Whisper-style audio encoder over 128 mel bins (idle in an image benchmark);
    # an image is Qwen-VL's placeholder
    "qwen3-omni-30b-a3b": {
        "architectures": ["Qwen3OmniMoeThinkerForConditionalGeneration"], "model_type": "qwen3_omni_moe_thinker",
        "audio_token_id": 151675, "image_token_id": 151655, "video_token_id": 151656, "audio_start_token_id": 151669,
        "audio_end_token_id": 151670, "vision_start_token_id": 151652, "position_id_per_seconds": 13,
        "user_token_id": 872, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "text_config": {
            "model_type": "qwen3_omni_moe_text", "vocab_size": 152064, "hidden_size": 2048, "intermediate_size": 768,
            "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True,
            "decoder_sparse_step": 1, "mlp_only_layers": [], "num_hidden_layers": 48, "num_attention_heads": 32,
            "num_key_value_heads": 4, "head_dim": 128, "max_position_embeddings": 65536, "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0, "rope_scaling": {"rope_type": "default", "mrope_section": [24, 20, 20],
                                                      "interleaved": True, "mrope_interleaved": True},
            "attention_bias": False, "hidden_act": "silu", "torch_dtype": "bfloat16",
        },
        "vision_config": {
            "model_type": "qwen3_omni_moe_vision_encoder", "depth": 27, "hidden_size": 1152, "intermediate_size": 4304,
            "num_heads": 16, "in_channels": 3, "hidden_act": "gelu_pytorch_tanh", "out_hidden_size": 2048,
            "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 2304,
            "deepstack_visual_indexes": [8, 16, 24],
        },
        "audio_config": {
            "model_type": "qwen3_omni_moe_audio_encoder", "num_mel_bins": 128, "encoder_layers": 32,
            "encoder_attention_heads": 20, "encoder_ffn_dim": 5120, "d_model": 1280, "output_dim": 2048,
            "max_source_positions": 1500, "n_window": 50, "n_window_infer": 800, "conv_chunksize": 500,
            "downsample_hidden_size": 480, "activation_function": "gelu",
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

# GLM-4.1V and GLM-4.5V: Qwen2-VL's resizing in 28 px steps, 12,544..9,633,792 pixels an image (the upper bound
# recalled; transformers' default is 11,760,000) and up to 47,040,000 for a video's frames
_GLM_PROCESSOR = {
    "preprocessor_config.json": {
        "image_processor_type": "Glm4vImageProcessor", "processor_class": "Glm4vProcessor",
        "size": {"shortest_edge": 12544, "longest_edge": 9633792}, "patch_size": 14, "temporal_patch_size": 2,
        "merge_size": 2, "do_rescale": True, "image_mean": _CLIP_MEAN, "image_std": _CLIP_STD},
    "video_preprocessor_config.json": {
        "video_processor_type": "Glm4vVideoProcessor", "processor_class": "Glm4vProcessor",
        "size": {"shortest_edge": 12544, "longest_edge": 47040000}, "patch_size": 14, "temporal_patch_size": 2,
        "merge_size": 2, "do_rescale": True, "image_mean": _CLIP_MEAN, "image_std": _CLIP_STD},
}
VISION_PROCESSORS |= {
    "glm-4.1v-9b": _GLM_PROCESSOR,
    "glm-4.5v": _GLM_PROCESSOR,
    # an image resized to the grid of 560 px tiles (up to 4) that fits it best and padded to 4 tiles
    "llama-3.2-11b-vision": {
        "preprocessor_config.json": {
            "image_processor_type": "MllamaImageProcessor", "processor_class": "MllamaProcessor",
            "size": {"height": 560, "width": 560}, "max_image_tiles": 4, "do_resize": True, "do_pad": True,
            "do_rescale": True, "rescale_factor": _RESCALE, "do_normalize": True, "do_convert_rgb": True,
            "resample": 2, "image_mean": _CLIP_MEAN, "image_std": _CLIP_STD},
    },
    # an image padded (white) to a grid of up to 36 crops of 448 px by its aspect, plus a global view; 256 tokens a
    # crop with a separator per row; the audio feature extractor's values share the file, as on the hub
    "phi-4-multimodal": {
        "preprocessor_config.json": {
            "image_processor_type": "Phi4MultimodalImageProcessor", "processor_class": "Phi4MultimodalProcessor",
            "size": {"height": 448, "width": 448}, "patch_size": 14, "dynamic_hd": 36, "do_rescale": True,
            "rescale_factor": _RESCALE, "do_normalize": True, "do_convert_rgb": True, "resample": 3,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
            "feature_extractor_type": "Phi4MultimodalFeatureExtractor", "feature_size": 80, "sampling_rate": 16000,
            "hop_length": 160, "n_fft": 512, "win_length": 400, "preemphasis": 0.97, "padding_value": 0.0,
            "audio_compression_rate": 8, "audio_downsample_rate": 1, "audio_feat_stride": 1,
            "return_attention_mask": True},
        "processor_config.json": {"processor_class": "Phi4MultimodalProcessor"},
    },
    # Qwen3-VL's resizing (32 px steps; the pixel bounds recalled) and Whisper's 128-bin features, in one file as on
    # the hub; videos through Qwen3-VL's video processor (the hub's video settings are not known here)
    "qwen3-omni-30b-a3b": {
        "preprocessor_config.json": {
            "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen3OmniMoeProcessor",
            "size": {"shortest_edge": 3136, "longest_edge": 12845056}, "patch_size": 16, "temporal_patch_size": 2,
            "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
            "feature_extractor_type": "WhisperFeatureExtractor", "feature_size": 128, "sampling_rate": 16000,
            "hop_length": 160, "n_fft": 400, "chunk_length": 300, "n_samples": 4800000, "nb_max_frames": 30000,
            "padding_value": 0.0, "dither": 0.0, "return_attention_mask": True},
        "video_preprocessor_config.json": {
            "video_processor_type": "Qwen3VLVideoProcessor", "processor_class": "Qwen3OmniMoeProcessor",
            "size": {"shortest_edge": 4096, "longest_edge": 25165824}, "patch_size": 16, "temporal_patch_size": 2,
            "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
    },
}

# Qwen's vision tokens, each by the config key that holds its id
QWEN_VISION_TOKENS = {"vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>",
                      "vision_token_id": "<|vision_pad|>", "image_token_id": "<|image_pad|>",
                      "video_token_id": "<|video_pad|>"}


@dataclass(frozen=True)
class VisionTokens:
    """What a vision-language preset's tokenizer adds to the given one: `ids`, the tokens whose ids the config
    holds (by config key, a sub-config's as "vision_config.image_token_id"); `named`, tokens the family's processor
    reads as tokenizer attributes (`image_token`, or a BOS it looks for); `extra`, more tokens its chat template
    writes; and the mmserve chat template of the family."""

    template: str
    ids: dict[str, str]
    named: dict[str, str] = field(default_factory=dict)
    extra: tuple[str, ...] = ()

    @property
    def unnamed(self) -> list[str]:
        named = set(self.named.values())
        return [t for t in dict.fromkeys([*self.ids.values(), *self.extra]) if t not in named]


_PIXTRAL_TOKENS = ("[IMG_BREAK]", "[IMG_END]", "[INST]", "[/INST]", "<s>")
_GLM_TOKEN_IDS = {"image_token_id": "<|image|>", "video_token_id": "<|video|>",
                  "image_start_token_id": "<|begin_of_image|>", "image_end_token_id": "<|end_of_image|>",
                  "video_start_token_id": "<|begin_of_video|>", "video_end_token_id": "<|end_of_video|>"}
_GLM_NAMED = {"image_token": "<|image|>", "video_token": "<|video|>"}
_GLM_TOKENS = ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>")
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
    "glm-4.1v-9b": VisionTokens("glm-4v", _GLM_TOKEN_IDS, named=_GLM_NAMED, extra=_GLM_TOKENS),
    "glm-4.5v": VisionTokens("glm-4.5v", _GLM_TOKEN_IDS, named=_GLM_NAMED, extra=(*_GLM_TOKENS, "<think>", "</think>")),
    # the template opens with Llama 3's BOS, which the processor looks for (it writes its own BOS otherwise)
    "llama-3.2-11b-vision": VisionTokens(
        "llama_3_vision", {"image_token_index": "<|image|>"},
        named={"bos_token": "<|begin_of_text|>", "image_token": "<|image|>"},
        extra=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    "phi-4-multimodal": VisionTokens(
        "phi-4-mm", {"vision_config.image_token_id": "<|image|>", "audio_config.audio_token_id": "<|audio|>"},
        named={"image_token": "<|image|>", "audio_token": "<|audio|>"},
        extra=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>")),
    "qwen3-omni-30b-a3b": VisionTokens(
        "qwen3-omni", {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                       "audio_token_id": "<|audio_pad|>", "audio_start_token_id": "<|audio_start|>",
                       "audio_end_token_id": "<|audio_end|>", "vision_start_token_id": "<|vision_start|>"},
        named={"audio_bos_token": "<|audio_start|>", "audio_eos_token": "<|audio_end|>",
               "audio_token": "<|audio_pad|>", "vision_bos_token": "<|vision_start|>",
               "vision_eos_token": "<|vision_end|>", "image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
        extra=("<|im_start|>", "<|im_end|>")),
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
        _point_ids(config, ids)
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


def _point_ids(config: dict, ids: dict[str, int]) -> None:
    """Set each token-id key the config has (a dotted key in its sub-config) to the tokenizer's id."""
    for key, token_id in ids.items():
        *parents, last = key.split(".")
        holder = config
        for parent in parents:
            holder = holder.get(parent) or {}
        if last in holder:
            holder[last] = token_id


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

    # a BOS or EOS replaces the tokenizer's own; other names are the family's extra special tokens
    core = {key: t for key, t in tokens.named.items() if key in ("bos_token", "eos_token")}
    named = {key: t for key, t in tokens.named.items() if key not in core}
    tok = AutoTokenizer.from_pretrained(tokenizer_dir, **core, **({"extra_special_tokens": named} if named else {}))
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
