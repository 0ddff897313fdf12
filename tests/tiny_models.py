"""Tiny random-weight models of real architectures, built with transformers and saved in Hugging Face layout
with SmolLM2's tokenizer (used by the fixture `tiny_model_dir` and by tests that iterate over families)."""

from __future__ import annotations

from pathlib import Path

import torch


def _tiny_configs():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

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
        # experts in layer 0, a dense MLP in layer 1; top-2 of 8 experts without renormalising the weights
        "qwen3_moe": lambda: Qwen3MoeConfig(**common, tie_word_embeddings=False, **TINY_MOE, norm_topk_prob=False,
                                            mlp_only_layers=[1]),
    }


# expert width 48: neither it nor 2 x 48 equals hidden 64, so the two layouts of fused expert tensors differ
TINY_MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, decoder_sparse_step=1)
TINY_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "qwen3_moe"]


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




VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def vision_tokenizer(tokenizer_dir: Path):
    """SmolLM2's tokenizer plus Qwen's vision tokens; returns it and the tokens' ids (start, end, image, video)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    return tok, tok.convert_tokens_to_ids(VISION_TOKENS)


def vl_text_config(vocab_size: int, mrope_section: list[int], **extra) -> dict:
    """The 2-layer, hidden-64 text model the tiny VL models share, with M-RoPE bands `mrope_section`."""
    return dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section},
                **extra)


def save_random_vl(model_cls, config, seed: int, out: Path) -> None:
    """Build `model_cls(config)` with large random weights (norms near one), so greedy choices are clear-cut."""
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_q" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.2)
    model.save_pretrained(out)


def build_tiny_qwen2_vl(tokenizer_dir: Path, out: Path) -> Path:
    """A 2-layer Qwen2-VL (2-block ViT) with SmolLM2's tokenizer plus Qwen's vision tokens, and its processor."""
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tok, ids = vision_tokenizer(tokenizer_dir)
    text = vl_text_config(len(tok), mrope_section=[2, 3, 3])
    config = Qwen2VLConfig(text_config=text, vision_config=dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2,
                                                                 hidden_size=64, patch_size=14, spatial_merge_size=2,
                                                                 temporal_patch_size=2),
                           vision_start_token_id=ids[0], vision_end_token_id=ids[1], image_token_id=ids[2],
                           video_token_id=ids[3], bos_token_id=1, eos_token_id=2, pad_token_id=2)
    save_random_vl(Qwen2VLForConditionalGeneration, config, 4321, out)
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 80),
                                 video_processor=Qwen2VLVideoProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 80),
                                 tokenizer=tok, chat_template=tok.chat_template)
    processor.save_pretrained(out)
    return out


def build_tiny_qwen2_5_vl(tokenizer_dir: Path, out: Path) -> Path:
    """A 2-layer Qwen2.5-VL with a 4-block ViT whose windows (56 px = 2x2 LLM tokens) are smaller than the test
    images, blocks 1 and 3 attending over whole frames; SmolLM2's tokenizer plus Qwen's vision tokens."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tok, ids = vision_tokenizer(tokenizer_dir)
    text = vl_text_config(len(tok), mrope_section=[2, 3, 3])
    vision = dict(depth=4, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1, 3],
                  tokens_per_second=2)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, vision_start_token_id=ids[0],
                              vision_end_token_id=ids[1], image_token_id=ids[2], video_token_id=ids[3],
                              bos_token_id=1, eos_token_id=2, pad_token_id=2)
    save_random_vl(Qwen2_5_VLForConditionalGeneration, config, 5432, out)
    pixels = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 96)
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**pixels),
                                    video_processor=Qwen2VLVideoProcessor(**pixels),
                                    tokenizer=tok, chat_template=tok.chat_template)
    processor.save_pretrained(out)
    return out


def build_tiny_qwen3_vl(tokenizer_dir: Path, out: Path, moe: bool = False) -> Path:
    """A 2-layer Qwen3-VL (head_dim 16, interleaved M-RoPE over [4, 2, 2] bands) with a 3-block ViT over 16 px
    patches, an 8x8 learned position table that test images are both larger and smaller than, and DeepStack from
    blocks 0 and 2; SmolLM2's tokenizer plus Qwen's vision tokens, and the Qwen3-VL processor. `moe`: the
    Qwen3-VL-MoE variant, experts (TINY_MOE) in both decoder layers."""
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLMoeConfig,
        Qwen3VLMoeForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    tok, ids = vision_tokenizer(tokenizer_dir)
    text = vl_text_config(len(tok), mrope_section=[4, 2, 2], head_dim=16, **(TINY_MOE if moe else {}))
    vision = dict(depth=3, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                  deepstack_visual_indexes=[0, 2])
    config_cls, model_cls = ((Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration) if moe
                             else (Qwen3VLConfig, Qwen3VLForConditionalGeneration))
    config = config_cls(text_config=text, vision_config=vision, vision_start_token_id=ids[0],
                        vision_end_token_id=ids[1], image_token_id=ids[2], video_token_id=ids[3],
                        tie_word_embeddings=False)
    save_random_vl(model_cls, config, 6543 + moe, out)
    # 32 px = one LLM token per side; at most 80 LLM tokens per image or frame pair
    size = {"shortest_edge": 64 * 64, "longest_edge": 32 * 32 * 80}
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size, patch_size=16, merge_size=2, temporal_patch_size=2,
                                              image_mean=[0.5] * 3, image_std=[0.5] * 3),
        video_processor=Qwen3VLVideoProcessor(size=size, patch_size=16, merge_size=2, temporal_patch_size=2,
                                              image_mean=[0.5] * 3, image_std=[0.5] * 3),
        tokenizer=tok, chat_template=tok.chat_template)
    processor.save_pretrained(out)
    return out
