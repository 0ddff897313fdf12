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


# llava-hf/llava-1.5-*: the user's images first, then their text, roles in capitals ("USER: <image>\nhi ASSISTANT:")
LLAVA_STYLE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def build_tiny_llava(tokenizer_dir: Path, out: Path) -> Path:
    """A 2-layer Llama with a 3-layer CLIP tower (42 px images, 14 px patches: 9 patches and a class token),
    features from layers -2 and 0 concatenated without the class token, and the 2-layer projector; SmolLM2's
    tokenizer plus `<image>` (the tokenizer's `image_token`), the LLaVA processor and the hub's template."""
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = AutoTokenizer.from_pretrained(tokenizer_dir, extra_special_tokens={"image_token": "<image>"})
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=2, image_size=42, patch_size=14, projection_dim=32, hidden_act="quick_gelu")
    text = dict(model_type="llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=1,
                eos_token_id=2, pad_token_id=2, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=[-2, 0], vision_feature_select_strategy="default",
                         projector_hidden_act="gelu", tie_word_embeddings=False)
    save_random_vl(LlavaForConditionalGeneration, config, 7654, out)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 42}, crop_size={"height": 42, "width": 42})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_STYLE)
    processor.save_pretrained(out)
    return out

# llava-hf/llava-v1.6-mistral-7b-hf: "[INST] <image>\nhi [/INST]", images first in each user turn
LLAVA_NEXT_MISTRAL_STYLE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\n' + message['content'][0]['text'] + '\n<</SYS>>\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'][0]['text'] + '</s>'}}{% endif %}"
    "{% endfor %}"
)


def build_tiny_llava_next(tokenizer_dir: Path, out: Path, text_model: str = "mistral") -> Path:
    """A 2-layer Mistral (or `text_model`: "qwen2") with a 2-layer CLIP tower over 28 px tiles (2x2 patches of
    14 px), tiles chosen from 28x56, 56x28 and 56x56 grids (3 or 5 tower passes per image with the base view), the
    penultimate layer's features; SmolLM2's tokenizer plus `<image>`, the LLaVA-NeXT processor and the hub's Mistral
    template."""
    from transformers import (
        AutoTokenizer,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tok = AutoTokenizer.from_pretrained(tokenizer_dir, extra_special_tokens={"image_token": "<image>"})
    pinpoints = [[28, 56], [56, 28], [56, 56]]
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=28, patch_size=14, projection_dim=32, hidden_act="quick_gelu")
    text = dict(model_type=text_model, vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False)
    config = LlavaNextConfig(vision_config=vision, text_config=text,
                             image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                             vision_feature_select_strategy="default", image_grid_pinpoints=pinpoints,
                             tie_word_embeddings=False)
    save_random_vl(LlavaNextForConditionalGeneration, config, 8765 + (text_model != "mistral"), out)
    image_processor = LlavaNextImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                              image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=14,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=LLAVA_NEXT_MISTRAL_STYLE)
    processor.save_pretrained(out)
    return out


# google/gemma-3-*-it: BOS, turns as "<start_of_turn>user\n...<end_of_turn>\n" (the assistant's role is "model"),
# a system message prefixed to the first user turn, images as "<start_of_image>" where they stand among the texts
GEMMA3_STYLE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = \"\" -%}"
    "{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}{%- endfor -%}"
    "{%- else -%}{{ raise_exception(\"Invalid content type\") }}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}"
)


def build_tiny_gemma3(tokenizer_dir: Path, out: Path) -> Path:
    """A 3-layer Gemma 3 decoder (two sliding-window layers with an 8-token window, then a global one with its own
    rotary base and linear scaling) under a 2-layer SigLIP tower over 56 px images (8x8 patches of 7 px, pooled to
    16 tokens); SmolLM2's tokenizer plus Gemma's image tokens (`boi_token`, `image_token`, `eoi_token`), the
    Gemma 3 processor and the hub's template."""
    from transformers import AutoTokenizer, Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor

    try:
        from transformers import Gemma3ImageProcessor
    except ImportError:  # pragma: no cover
        from transformers import Gemma3ImageProcessorFast as Gemma3ImageProcessor

    tok = AutoTokenizer.from_pretrained(tokenizer_dir, extra_special_tokens={
        "boi_token": "<start_of_image>", "image_token": "<image_soft_token>", "eoi_token": "<end_of_image>"})
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=56, patch_size=7, vision_use_head=False)
    text = dict(model_type="gemma3_text", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                query_pre_attn_scalar=24, sliding_window=8,
                layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                                 "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
                max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    ids = {name: tok.convert_tokens_to_ids(getattr(tok, name)) for name in ("boi_token", "image_token", "eoi_token")}
    config = Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=16,
                          boi_token_index=ids["boi_token"], eoi_token_index=ids["eoi_token"],
                          image_token_index=ids["image_token"])
    save_random_vl(Gemma3ForConditionalGeneration, config, 9876, out)
    image_processor = Gemma3ImageProcessor(size={"height": 56, "width": 56})
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tok, image_seq_length=16,
                                chat_template=GEMMA3_STYLE)
    processor.save_pretrained(out)
    return out


# llava-hf/llava-onevision-qwen2-*-ov-hf: ChatML turns without a default system prompt, each turn's images first
# ("<image>\n" each), then its videos ("<video>\n" each), then its texts
LLAVA_ONEVISION_STYLE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all video then #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_llava_onevision(tokenizer_dir: Path, out: Path) -> Path:
    """A 2-layer Qwen2 under a 2-layer SigLIP tower over 28 px views of 4 px patches (7x7 features: odd, as the
    real 27x27, so the video pooling's rounding up shows), tiles from 28x56, 56x28 and 56x56 grids, `anyres_max_2`
    (a 2x2 grid's map is shrunk, a 1x2 grid's is not), the last layer's features in full; SmolLM2's tokenizer plus
    `<image>` and `<video>`, the OneVision processor and the hub's template."""
    from transformers import (
        AutoTokenizer,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    tok = AutoTokenizer.from_pretrained(tokenizer_dir, extra_special_tokens={"image_token": "<image>",
                                                                            "video_token": "<video>"})
    pinpoints = [[28, 56], [56, 28], [56, 56]]
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=28, patch_size=4, vision_use_head=False)
    text = dict(model_type="qwen2", vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=1,
                eos_token_id=2, pad_token_id=2, tie_word_embeddings=False)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text,
                                  image_token_id=tok.convert_tokens_to_ids("<image>"),
                                  video_token_id=tok.convert_tokens_to_ids("<video>"), vision_feature_layer=-1,
                                  vision_feature_select_strategy="full", image_grid_pinpoints=pinpoints,
                                  vision_aspect_ratio="anyres_max_2", tie_word_embeddings=False)
    save_random_vl(LlavaOnevisionForConditionalGeneration, config, 9123, out)
    size = {"height": 28, "width": 28}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=pinpoints),
        video_processor=LlavaOnevisionVideoProcessor(size=size), tokenizer=tok, num_image_tokens=49,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_2", chat_template=LLAVA_ONEVISION_STYLE)
    processor.save_pretrained(out)
    return out


# llava-hf/LLaVA-NeXT-Video-7B-hf: LLaVA 1.5's form ("USER: <image>\nhi ASSISTANT:") with each turn's videos
# ("<video>\n") after its images
LLAVA_NEXT_VIDEO_STYLE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all video then #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def build_tiny_llava_next_video(tokenizer_dir: Path, out: Path, pool_mode: str = "average") -> Path:
    """A 2-layer Llama under a 2-layer CLIP tower over 28 px tiles of 7 px patches (4x4 features, pooled to 2x2 for
    video frames by `pool_mode`), tiles from 28x56, 56x28 and 56x56 grids, the penultimate layer's features;
    SmolLM2's tokenizer plus `<image>` and `<video>`, the LLaVA-NeXT-Video processor and the hub's template."""
    from transformers import (
        AutoTokenizer,
        LlavaNextImageProcessor,
        LlavaNextVideoConfig,
        LlavaNextVideoForConditionalGeneration,
        LlavaNextVideoProcessor,
        LlavaNextVideoVideoProcessor,
    )

    tok = AutoTokenizer.from_pretrained(tokenizer_dir, extra_special_tokens={"image_token": "<image>",
                                                                            "video_token": "<video>"})
    pinpoints = [[28, 56], [56, 28], [56, 56]]
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=28, patch_size=7, projection_dim=32, hidden_act="quick_gelu")
    text = dict(model_type="llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=1,
                eos_token_id=2, pad_token_id=2, tie_word_embeddings=False)
    config = LlavaNextVideoConfig(vision_config=vision, text_config=text,
                                  image_token_id=tok.convert_tokens_to_ids("<image>"),
                                  video_token_id=tok.convert_tokens_to_ids("<video>"), vision_feature_layer=-2,
                                  vision_feature_select_strategy="default", image_grid_pinpoints=pinpoints,
                                  spatial_pool_mode=pool_mode, spatial_pool_stride=2, tie_word_embeddings=False)
    save_random_vl(LlavaNextVideoForConditionalGeneration, config, 9345 + (pool_mode != "average"), out)
    crop = {"height": 28, "width": 28}
    processor = LlavaNextVideoProcessor(
        image_processor=LlavaNextImageProcessor(size={"shortest_edge": 28}, crop_size=crop,
                                                image_grid_pinpoints=pinpoints),
        video_processor=LlavaNextVideoVideoProcessor(size={"shortest_edge": 28}, crop_size=crop), tokenizer=tok,
        patch_size=7, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_NEXT_VIDEO_STYLE)
    processor.save_pretrained(out)
    return out


# mistral-community/pixtral-12b: "[INST]" turns, a system prompt opening the last one, each part in place
# ("[IMG]" for an image)
PIXTRAL_STYLE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/"
    "user/assistant/...') }}{%- endif %}"
    "{%- if message['role'] == 'user' %}{%- if loop.last and system_message is defined %}"
    "{{- '[INST]' + system_message + '\n\n' }}{%- else %}{{- '[INST]' }}{%- endif %}"
    "{%- if message['content'] is not string %}{%- for chunk in message['content'] %}"
    "{%- if chunk['type'] == 'text' %}{{- chunk['text'] }}{%- elif chunk['type'] == 'image' %}{{- '[IMG]' }}"
    "{%- else %}{{- raise_exception('Unrecognized content type!') }}{%- endif %}{%- endfor %}"
    "{%- else %}{{- message['content'] }}{%- endif %}{{- '[/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}{{- message['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported, with the exception of an initial "
    "optional system message!') }}{%- endif %}{%- endfor %}"
)

# mistralai/Mistral-Small-3.1-24B-Instruct-2503: a [SYSTEM_PROMPT] block (a default one when the chat has none; the
# hub's dates it with strftime_now), then "[INST]" turns with image / image_url parts as "[IMG]" in place
MISTRAL3_STYLE = (
    "{%- set default_system_message = 'You are Mistral Small 3, a Large Language Model (LLM) created by Mistral "
    "AI.' %}{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- if messages[0]['content'] is string %}"
    "{%- set system_message = messages[0]['content'] %}{%- else %}"
    "{%- set system_message = messages[0]['content'][0]['text'] %}{%- endif %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set system_message = default_system_message %}"
    "{%- set loop_messages = messages %}{%- endif %}"
    "{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}"
    "{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
    "{%- if message['content'] is string %}{{- '[INST]' + message['content'] + '[/INST]' }}{%- else %}"
    "{{- '[INST]' }}{%- for block in message['content'] %}{%- if block['type'] == 'text' %}{{- block['text'] }}"
    "{%- elif block['type'] in ['image', 'image_url'] %}{{- '[IMG]' }}{%- else %}"
    "{{- raise_exception('Only text and image blocks are supported in message content!') }}{%- endif %}"
    "{%- endfor %}{{- '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'system' %}{%- if message['content'] is string %}"
    "{{- '[SYSTEM_PROMPT]' + message['content'] + '[/SYSTEM_PROMPT]' }}{%- else %}"
    "{{- '[SYSTEM_PROMPT]' + message['content'][0]['text'] + '[/SYSTEM_PROMPT]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{%- if message['content'] is string %}"
    "{{- message['content'] + eos_token }}{%- else %}{{- message['content'][0]['text'] + eos_token }}{%- endif %}"
    "{%- else %}{{- raise_exception('Only user, system and assistant roles are supported!') }}{%- endif %}"
    "{%- endfor %}"
)

PIXTRAL_TOKENS = ["[IMG]", "[IMG_BREAK]", "[IMG_END]", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]


def _pixtral_parts(tokenizer_dir: Path, patch_size: int) -> tuple:
    """SmolLM2's tokenizer plus Pixtral's image and instruction tokens, and a 2-block Pixtral tower (head_dim 16)
    over `patch_size` px patches."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": PIXTRAL_TOKENS})
    vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=64, patch_size=patch_size, hidden_act="silu",
                  rope_parameters={"rope_type": "axial", "rope_theta": 10000.0})
    text = dict(model_type="mistral", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=2, sliding_window=None,
                tie_word_embeddings=False)
    return tok, vision, text


def _pixtral_processor(tok, patch_size: int, merge: int, longest_edge: int, template: str, out: Path) -> None:
    from transformers import PixtralImageProcessor, PixtralProcessor

    image_processor = PixtralImageProcessor(size={"longest_edge": longest_edge},
                                            patch_size={"height": patch_size, "width": patch_size})
    PixtralProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch_size,
                     spatial_merge_size=merge, chat_template=template).save_pretrained(out)


def build_tiny_pixtral(tokenizer_dir: Path, out: Path) -> Path:
    """LLaVA with a Pixtral tower (pixtral-12b's layout): 8 px patches, images up to 48 px on the longest edge (at
    most 6x6 patches, each row closed by [IMG_BREAK], the last by [IMG_END]), the last layer's features in full, a
    2-layer Mistral; the Pixtral processor and the hub's template."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    tok, vision, text = _pixtral_parts(tokenizer_dir, 8)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("[IMG]"),
                         vision_feature_layer=-1, vision_feature_select_strategy="full",
                         projector_hidden_act="gelu", multimodal_projector_bias=True, tie_word_embeddings=False)
    save_random_vl(LlavaForConditionalGeneration, config, 9345, out)
    _pixtral_processor(tok, 8, 1, 48, PIXTRAL_STYLE, out)
    return out


def build_tiny_mistral3(tokenizer_dir: Path, out: Path) -> Path:
    """Mistral-Small-3.1's layout: a Pixtral tower over 8 px patches, images up to 64 px on the longest edge,
    RMSNorm and a 2x2 patch merger (one token per 16 px: at most 4x4, with [IMG_BREAK] / [IMG_END]), the
    projector, a 2-layer Mistral; the Pixtral processor (spatial_merge_size 2) and the hub's template."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    tok, vision, text = _pixtral_parts(tokenizer_dir, 8)
    config = Mistral3Config(vision_config=vision, text_config=text,
                            image_token_index=tok.convert_tokens_to_ids("[IMG]"), vision_feature_layer=-1,
                            spatial_merge_size=2, projector_hidden_act="gelu", multimodal_projector_bias=False,
                            tie_word_embeddings=False)
    save_random_vl(Mistral3ForConditionalGeneration, config, 9456, out)
    _pixtral_processor(tok, 8, 2, 64, MISTRAL3_STYLE, out)
    return out


# OpenGVLab/InternVL3-*-hf (transformers' conversion): ChatML turns without a default system prompt, images as
# "<IMG_CONTEXT>\n" and videos as "<video>\n" where they stand among the texts
INTERNVL_STYLE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_internvl(tokenizer_dir: Path, out: Path, text_model: str = "qwen2") -> Path:
    """A 2-layer Qwen2 (InternVL 3) or Qwen3 (`text_model="qwen3"`, InternVL 3.5) under a 2-layer InternViT over
    28 px tiles of 7 px patches (4x4, pixel-shuffled to 4 tokens a tile), tiles on grids of up to 6 plus a
    thumbnail. The Qwen2 one has the hub's tower (LayerNorm, biased q/k/v, no final norm) and untied embeddings; the
    Qwen3 one the other switches (RMSNorm, q/k norm, unbiased q/k/v, the final LayerNorm) and tied embeddings.
    SmolLM2's tokenizer plus InternVL's tokens (`start_image_token`, `end_image_token`, `context_image_token`,
    `video_token`), the InternVL processor with its video processor, and the hub's template."""
    from transformers import (
        AutoTokenizer,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
    )

    try:
        from transformers import GotOcr2ImageProcessor
    except ImportError:  # pragma: no cover
        from transformers import GotOcr2ImageProcessorFast as GotOcr2ImageProcessor

    tok = AutoTokenizer.from_pretrained(tokenizer_dir, extra_special_tokens={
        "start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>"})
    qwen3 = text_model == "qwen3"
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                  patch_size=7, hidden_act="gelu", norm_type="rms_norm" if qwen3 else "layer_norm",
                  use_qk_norm=qwen3, attention_bias=not qwen3, use_mean_pooling=not qwen3,
                  layer_norm_eps=1e-5 if qwen3 else 1e-6)
    text = dict(model_type=text_model, vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=qwen3,
                **({"head_dim": 32} if qwen3 else {}))
    config = InternVLConfig(vision_config=vision, text_config=text,
                            image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=4,
                            downsample_ratio=0.5, vision_feature_layer=-1, tie_word_embeddings=qwen3)
    save_random_vl(InternVLForConditionalGeneration, config, 6543 + qwen3, out)
    size = {"height": 28, "width": 28}
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=size, crop_to_patches=True, min_patches=1, max_patches=6),
        video_processor=InternVLVideoProcessor(size=size), tokenizer=tok, image_seq_length=4,
        chat_template=INTERNVL_STYLE)
    processor.save_pretrained(out)
    return out


# deepseek-community/Janus-Pro-*: "<|User|>: " and "<|Assistant|>:" turns ended by "\n\n" (user) or the end of
# sentence (the others); within a turn, texts trimmed at its ends and joined by a space, images on their own line
JANUS_STYLE = (
    "{%set seps=['\n\n','<\uff5cend\u2581of\u2581sentence\uff5c>']%}{%set i=0%}{%for message in messages%}"
    "{%if message['role']|lower=='user'%}<|User|>: "
    "{%elif message['role']|lower=='assistant'%}<|Assistant|>:{%if not (loop.last and not add_generation_prompt and "
    "message['content'][0]['type']=='text' and message['content'][0]['text']=='')%} {%endif%}"
    "{%else%}{{message['role'].capitalize()}}: {%endif%}"
    "{%for content in message['content']%}{%if content['type']=='image'%}"
    "{%if not loop.first%}{{'\n'}}{%endif%}<image_placeholder>{%if not loop.last%}{{'\n'}}{%endif%}"
    "{%elif content['type']=='text'%}{%set text=content['text']%}"
    "{%if loop.first%}{%set text=text.lstrip()%}{%endif%}{%if loop.last%}{%set text=text.rstrip()%}{%endif%}"
    "{%if not loop.first and message['content'][loop.index0-1]['type']=='text'%}{{' '+text}}{%else%}{{text}}"
    "{%endif%}{%endif%}{%endfor%}"
    "{%if not loop.last or add_generation_prompt%}{%if message['role']|lower=='user'%}{{seps[0]}}{%else%}"
    "{{seps[1]}}{%endif%}{%endif%}{%endfor%}{%if add_generation_prompt%}<|Assistant|>:{%endif%}"
)


def build_tiny_janus(tokenizer_dir: Path, out: Path) -> Path:
    """Janus-Pro: a 2-layer Llama under a 2-layer SigLIP-style tower over 28 px images (4x4 patches of 7 px, 16
    tokens each) and the 2-layer aligner, plus a tiny VQ model and generation head (never loaded by mmserve);
    SmolLM2's tokenizer plus Janus's image tokens (`image_token`, `boi_token`, `eoi_token`), the Janus processor
    (its default system prompt off, transformers' default) and the hub's template."""
    from transformers import AutoTokenizer, JanusConfig, JanusForConditionalGeneration, JanusProcessor

    try:
        from transformers import JanusImageProcessor
    except ImportError:  # pragma: no cover
        from transformers import JanusImageProcessorFast as JanusImageProcessor

    tok = AutoTokenizer.from_pretrained(tokenizer_dir, extra_special_tokens={
        "image_token": "<image_placeholder>", "boi_token": "<begin_of_image>", "eoi_token": "<end_of_image>"})
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=7,
                  mlp_ratio=2.0, projection_dim=64, depth=2, num_image_tokens=16, hidden_act="gelu")
    text = dict(model_type="llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=1,
                eos_token_id=2, pad_token_id=2, tie_word_embeddings=False)
    vq = dict(embed_dim=8, num_embeddings=32, latent_channels=8, base_channels=32, channel_multiplier=[1, 1],
              num_res_blocks=1, projection_dim=64, image_token_embed_dim=64, num_hidden_layers=1)
    config = JanusConfig(vision_config=vision, text_config=text, vq_config=vq,
                         image_token_id=tok.convert_tokens_to_ids("<image_placeholder>"), tie_word_embeddings=False)
    save_random_vl(JanusForConditionalGeneration, config, 4321, out)
    processor = JanusProcessor(image_processor=JanusImageProcessor(size={"height": 28, "width": 28}), tokenizer=tok,
                               num_image_tokens=16, use_default_system_prompt=False,
                               chat_template=JANUS_STYLE)
    processor.save_pretrained(out)
    return out


# zai-org/GLM-4.1V-9B-Thinking's template, less its thinking and tool parts: "[gMASK]<sop>", roles as special tokens,
# each content part in order, images and videos wrapped in their begin/end tokens
GLM4V_STYLE = (
    "[gMASK]<sop>{%- for msg in messages %}{%- if msg.role == 'system' %}<|system|>\n{{ msg.content }}"
    "{%- elif msg.role == 'user' %}<|user|>{{ '\\n' }}{%- if msg.content is string %}{{ msg.content }}{%- else %}"
    "{%- for item in msg.content %}{%- if item.type == 'video' or 'video' in item %}"
    "<|begin_of_video|><|video|><|end_of_video|>{%- elif item.type == 'image' or 'image' in item %}"
    "<|begin_of_image|><|image|><|end_of_image|>{%- elif item.type == 'text' %}{{ item.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}{%- elif msg.role == 'assistant' %}<|assistant|>\n{{ msg.content }}{%- endif %}"
    "{%- endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
GLM4V_TOKENS = ["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|begin_of_image|>",
                "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>"]


def build_tiny_glm4v(tokenizer_dir: Path, out: Path) -> Path:
    """A 2-layer GLM-4.1V (head_dim 16, rotary on its first 8 dims over [2, 1, 1] M-RoPE bands) under a 2-block ViT
    over 14 px patches with a 4x4 learned position table (test images are larger and smaller) and a qkv bias;
    SmolLM2's tokenizer plus GLM's tokens (`image_token`, `video_token` named), the GLM-4V processor and template."""
    from transformers import (
        AutoTokenizer,
        Glm4vConfig,
        Glm4vForConditionalGeneration,
        Glm4vImageProcessor,
        Glm4vProcessor,
        Glm4vVideoProcessor,
    )

    tok = AutoTokenizer.from_pretrained(tokenizer_dir, extra_special_tokens={"image_token": "<|image|>",
                                                                             "video_token": "<|video|>"})
    tok.add_special_tokens({"additional_special_tokens": GLM4V_TOKENS})
    ids = {t: tok.convert_tokens_to_ids(t) for t in ["<|image|>", "<|video|>", *GLM4V_TOKENS]}
    text = vl_text_config(len(tok), mrope_section=[2, 1, 1])
    text["rope_parameters"]["partial_rotary_factor"] = 0.5
    vision = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64, patch_size=14,
                  image_size=56, spatial_merge_size=2, temporal_patch_size=2, attention_bias=True)
    config = Glm4vConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image|>"],
                         video_token_id=ids["<|video|>"], image_start_token_id=ids["<|begin_of_image|>"],
                         image_end_token_id=ids["<|end_of_image|>"], video_start_token_id=ids["<|begin_of_video|>"],
                         video_end_token_id=ids["<|end_of_video|>"], tie_word_embeddings=False)
    save_random_vl(Glm4vForConditionalGeneration, config, 7654, out)
    # 28 px = one LLM token per side; at most 48 LLM tokens per image or frame pair (pixels count both frames)
    size = {"shortest_edge": 2 * 56 * 56, "longest_edge": 2 * 28 * 28 * 48}
    processor = Glm4vProcessor(image_processor=Glm4vImageProcessor(size=size),
                               video_processor=Glm4vVideoProcessor(size=size, max_image_size={"longest_edge": size[
                                   "longest_edge"]}),
                               tokenizer=tok, chat_template=GLM4V_STYLE)
    processor.save_pretrained(out)
    return out


# Embedding and score models (tests/models/test_embeddings.py): architecture -> (family config, extra).
# `*Model` checkpoints are saved from the bare decoder (tensor names without "model."), as embedders ship.
POOLING_MODELS = {
    "qwen2_embed": ("qwen2", "Qwen2Model", {}),  # last token, normalised (no sentence-transformers files)
    "llama_embed_mean": ("llama", "LlamaModel", {"pooling": "mean"}),  # sentence-transformers: mean + Normalize
    "mistral_embed_cls": ("mistral", "MistralModel", {"pooling": "cls"}),  # sentence-transformers: CLS, raw
    "qwen2_cls": ("qwen2", "Qwen2ForSequenceClassification", {"num_labels": 3}),
    "llama_cls": ("llama", "LlamaForSequenceClassification", {"num_labels": 2}),
    "qwen3_reward": ("qwen3", "Qwen3ForSequenceClassification", {"num_labels": 1}),
}


def build_tiny_pooling_model(kind: str, tokenizer_dir: Path, out: Path) -> Path:
    """A 2-layer random embedder or sequence classifier of POOLING_MODELS[kind], float32, with SmolLM2's
    tokenizer; an embedder with a pooling method also gets sentence-transformers' modules.json and
    1_Pooling/config.json."""
    import json
    import shutil

    import transformers

    family, arch, extra = POOLING_MODELS[kind]
    torch.manual_seed(4242 + list(POOLING_MODELS).index(kind))
    config = _tiny_configs()[family]()
    if "num_labels" in extra:
        config.num_labels = extra["num_labels"]
        config.id2label = {i: f"label_{i}" for i in range(extra["num_labels"])}
        config.label2id = {v: k for k, v in config.id2label.items()}
    config.architectures = [arch]
    model = getattr(transformers, arch)(config).to(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.2)
    model.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    pooling = extra.get("pooling")
    if pooling is not None:
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        if pooling == "mean":
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                            "type": "sentence_transformers.models.Normalize"})
        (out / "modules.json").write_text(json.dumps(modules))
        (out / "1_Pooling").mkdir()
        (out / "1_Pooling" / "config.json").write_text(json.dumps({
            "word_embedding_dimension": config.hidden_size, "pooling_mode_cls_token": pooling == "cls",
            "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": False,
            "pooling_mode_lasttoken": False}))
    return out


def build_tiny_gemma2(tokenizer_dir: Path, out: Path, arch: str = "Gemma2ForCausalLM") -> Path:
    """A 2-layer random Gemma 2 (one sliding layer with a window shorter than the prompts, one global) as a causal
    LM or a one-label reward model (`arch`), float32, with SmolLM2's tokenizer. The caps are small enough that
    both bend the numbers: attention scores reach a few units with these weights."""
    import shutil

    import transformers
    from transformers import Gemma2Config

    torch.manual_seed(2222 + (arch != "Gemma2ForCausalLM"))
    config = Gemma2Config(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                          sliding_window=6, attn_logit_softcapping=2.0, final_logit_softcapping=5.0,
                          max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                          num_labels=1, architectures=[arch])
    model = getattr(transformers, arch)(config).to(torch.float32)
    with torch.no_grad():  # norms scale by (1 + w): w near zero
        for name, p in model.named_parameters():
            p.copy_(0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    model.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


OMNI_TOKENS = {"audio_bos_token": "<|audio_start|>", "audio_eos_token": "<|audio_end|>",
               "audio_token": "<|audio_pad|>", "vision_bos_token": "<|vision_start|>",
               "vision_eos_token": "<|vision_end|>", "image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}

# Qwen3-Omni-Instruct's hub template, reduced to what the tests use: media parts by `type` (or key) in place
QWEN3_OMNI_STYLE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "<|audio_start|><|audio_pad|><|audio_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_qwen3_omni(tokenizer_dir: Path, out: Path) -> Path:
    """A Qwen3-Omni thinker: the tiny Qwen3-VL-MoE stack (experts in both decoder layers, 3-block ViT with DeepStack)
    plus a 2-layer Whisper-style audio encoder over 16 mel bins: 1 s chunks (n_window 50, the reference's token
    count assumes it) and attention windows of one chunk (n_window_infer 100), so clips over 1 s cross both. SmolLM2's
    tokenizer with Omni's tokens named as the processor reads them, the Whisper feature extractor and a hub-style
    template."""
    from transformers import (
        AutoTokenizer,
        Qwen2VLImageProcessor,
        Qwen3OmniMoeProcessor,
        Qwen3OmniMoeThinkerConfig,
        Qwen3OmniMoeThinkerForConditionalGeneration,
        Qwen3VLVideoProcessor,
        WhisperFeatureExtractor,
    )

    tok = AutoTokenizer.from_pretrained(tokenizer_dir, extra_special_tokens=OMNI_TOKENS)
    ids = {name: tok.convert_tokens_to_ids(token) for name, token in OMNI_TOKENS.items()}
    text = vl_text_config(len(tok), mrope_section=[4, 2, 2], head_dim=16, **TINY_MOE, norm_topk_prob=True)
    vision = dict(depth=3, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                  deepstack_visual_indexes=[0, 2])
    audio = dict(num_mel_bins=16, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, d_model=32,
                 output_dim=64, n_window=50, n_window_infer=100, downsample_hidden_size=8, max_source_positions=100)
    config = Qwen3OmniMoeThinkerConfig(text_config=text, vision_config=vision, audio_config=audio,
                                       audio_token_id=ids["audio_token"], image_token_id=ids["image_token"],
                                       video_token_id=ids["video_token"], audio_start_token_id=ids["audio_bos_token"],
                                       vision_start_token_id=ids["vision_bos_token"], position_id_per_seconds=13,
                                       tie_word_embeddings=False)
    config.architectures = ["Qwen3OmniMoeThinkerForConditionalGeneration"]
    save_random_vl(Qwen3OmniMoeThinkerForConditionalGeneration, config, 8765, out)
    size = {"shortest_edge": 64 * 64, "longest_edge": 32 * 32 * 80}
    vision_kwargs = dict(size=size, patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3,
                         image_std=[0.5] * 3)
    processor = Qwen3OmniMoeProcessor(image_processor=Qwen2VLImageProcessor(**vision_kwargs),
                                      video_processor=Qwen3VLVideoProcessor(**vision_kwargs),
                                      feature_extractor=WhisperFeatureExtractor(feature_size=16),
                                      tokenizer=tok, chat_template=QWEN3_OMNI_STYLE)
    processor.save_pretrained(out)
    return out


# zai-org/GLM-4.5V's template, less its tool and reasoning-history parts: GLM-4.1V's turns and media parts, the
# generation prompt without a newline, and `enable_thinking=False` as "/nothink" after the user's turn and an empty
# think block after the prompt
GLM45V_STYLE = (
    "[gMASK]<sop>{%- for msg in messages %}{%- if msg.role == 'system' %}<|system|>\n{{ msg.content }}"
    "{%- elif msg.role == 'user' %}<|user|>{{ '\\n' }}{%- if msg.content is string %}{{ msg.content }}{%- else %}"
    "{%- for item in msg.content %}{%- if item.type == 'video' or 'video' in item %}"
    "<|begin_of_video|><|video|><|end_of_video|>{%- elif item.type == 'image' or 'image' in item %}"
    "<|begin_of_image|><|image|><|end_of_image|>{%- elif item.type == 'text' %}{{ item.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}{{ '/nothink' if (enable_thinking is defined and not enable_thinking) else '' }}"
    "{%- elif msg.role == 'assistant' %}<|assistant|>\n{{ msg.content }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|assistant|>"
    "{{ '\\n<think></think>' if (enable_thinking is defined and not enable_thinking) else '' }}{%- endif %}"
)


def build_tiny_glm4v_moe(tokenizer_dir: Path, out: Path) -> Path:
    """A 2-layer GLM-4.5V: layer 0 dense (first_k_dense_replace=1), layer 1 a mixture of 8 experts in 2 groups
    (top-2 from the best group, routed scaling 2.5) plus a shared expert, a random score-correction bias;
    head_dim 32 apart from hidden / heads, rotary on its first 16 dims over [4, 2, 2] M-RoPE bands; GLM-4.1V's tiny
    tower, processor and tokens (plus the think tokens), the GLM-4.5V-style template."""
    from transformers import (
        AutoTokenizer,
        Glm4vImageProcessor,
        Glm4vMoeConfig,
        Glm4vMoeForConditionalGeneration,
        Glm4vProcessor,
        Glm4vVideoProcessor,
    )

    tok = AutoTokenizer.from_pretrained(tokenizer_dir, extra_special_tokens={"image_token": "<|image|>",
                                                                             "video_token": "<|video|>"})
    tok.add_special_tokens({"additional_special_tokens": [*GLM4V_TOKENS, "<think>", "</think>"]})
    ids = {t: tok.convert_tokens_to_ids(t) for t in ["<|image|>", "<|video|>", *GLM4V_TOKENS]}
    text = vl_text_config(len(tok), mrope_section=[4, 2, 2], head_dim=32, attention_bias=True,
                          moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                          topk_group=1, n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5,
                          norm_topk_prob=True)
    text["rope_parameters"]["partial_rotary_factor"] = 0.5
    vision = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64, patch_size=14,
                  image_size=56, spatial_merge_size=2, temporal_patch_size=2, attention_bias=True)
    config = Glm4vMoeConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image|>"],
                            video_token_id=ids["<|video|>"], image_start_token_id=ids["<|begin_of_image|>"],
                            image_end_token_id=ids["<|end_of_image|>"], video_start_token_id=ids["<|begin_of_video|>"],
                            video_end_token_id=ids["<|end_of_video|>"], tie_word_embeddings=False)

    def with_correction_bias(config):  # a buffer, which save_random_vl leaves at zero
        model = Glm4vMoeForConditionalGeneration(config)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.3 * torch.randn_like(buffer))
        return model

    save_random_vl(with_correction_bias, config, 8765, out)
    size = {"shortest_edge": 2 * 56 * 56, "longest_edge": 2 * 28 * 28 * 48}
    processor = Glm4vProcessor(image_processor=Glm4vImageProcessor(size=size),
                               video_processor=Glm4vVideoProcessor(size=size, max_image_size={"longest_edge": size[
                                   "longest_edge"]}),
                               tokenizer=tok, chat_template=GLM45V_STYLE)
    processor.save_pretrained(out)
    return out


def build_tiny_clip(tokenizer_dir: Path, out: Path) -> Path:
    """A random `CLIPModel` (2-layer towers, hidden 32, 32x32 images in 8x8 patches, projection 24), float32, with
    SmolLM2's tokenizer made to frame every text as CLIP's does (start, text, end-of-text: the token CLIP pools,
    here `<|endoftext|>`, id 0) and CLIP's image processor."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|im_start|> $A <|endoftext|>", special_tokens=[("<|im_start|>", 1), ("<|endoftext|>", 0)])
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(text_config=dict(**tower, vocab_size=len(tok), max_position_embeddings=77, bos_token_id=1,
                                         eos_token_id=0, pad_token_id=2),
                        vision_config=dict(**tower, image_size=32, patch_size=8), projection_dim=24,
                        architectures=["CLIPModel"])
    torch.manual_seed(3333)
    model = CLIPModel(config).to(torch.float32).eval()
    with torch.no_grad():  # layer norms near one, the rest larger than the default init
        for name, p in model.named_parameters():
            if "norm" in name or "layrnorm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            elif name != "logit_scale":
                p.normal_(0.0, 0.2)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return out


PHI4_MM_TOKENS = {"image_token": "<|image|>", "audio_token": "<|audio|>"}
# microsoft/Phi-4-multimodal-instruct's turns as transformers' converted processor renders them: "<|role|>", the
# parts in order (an image as `<|image|>`, a clip as `<|audio|>`), "<|end|>"; then "<|assistant|>" to generate
PHI4_MM_STYLE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<|image|>' }}"
    "{% elif part['type'] == 'audio' %}{{ '<|audio|>' }}{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{ '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)


def build_tiny_phi4_multimodal(tokenizer_dir: Path, out: Path) -> Path:
    """A 2-layer Phi-4-multimodal decoder (fused qkv and gate/up, LongRoPE on 0.75 of each 16-dim head, its short
    factors and the attention factor of a 4x stretch in use below 2048 positions) under a
    2-layer SigLIP-style tower read at its first layer (`feature_layer` -2) and a 1-block Conformer audio encoder
    over 80 mel bins (the feature extractor's default, which the encoder's input size must match), its streaming
    chunks of 6 steps seeing one chunk back, relative positions clamped at 20 steps. The processor
    hard-codes 448 px crops of 14 px patches pooled to 16x16 tokens, so the tower keeps them: one small image is a
    global view plus one crop, 545 tokens. SmolLM2's tokenizer with `<|image|>` and `<|audio|>` named as the
    processor reads them, and the hub's turns (`PHI4_MM_STYLE`)."""
    from transformers import (
        AutoTokenizer,
        Phi4MultimodalConfig,
        Phi4MultimodalFeatureExtractor,
        Phi4MultimodalForCausalLM,
        Phi4MultimodalImageProcessor,
        Phi4MultimodalProcessor,
    )

    tok = AutoTokenizer.from_pretrained(tokenizer_dir, extra_special_tokens=PHI4_MM_TOKENS)
    ids = {name: tok.convert_tokens_to_ids(token) for name, token in PHI4_MM_TOKENS.items()}
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=448, patch_size=14, crop_size=448, image_token_id=ids["image_token"])
    audio = dict(hidden_size=32, intermediate_size=48, num_blocks=1, num_attention_heads=2, ext_pw_out_channel=32,
                 depthwise_separable_out_channel=32, nemo_conv_channels=8, input_size=80, bias_max_distance=20,
                 chunk_size=6, left_chunk=1, audio_token_id=ids["audio_token"])
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
            "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5], "long_factor": [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]}
    config = Phi4MultimodalConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                                  original_max_position_embeddings=2048, rope_parameters=rope,
                                  bos_token_id=1, eos_token_id=2, pad_token_id=2, vision_config=vision,
                                  audio_config=audio)
    config.architectures = ["Phi4MultimodalForCausalLM"]
    save_random_vl(Phi4MultimodalForCausalLM, config, 4444, out)
    tok.chat_template = PHI4_MM_STYLE  # the processor's own copy is lost on save and reload; the tokenizer's stays
    processor = Phi4MultimodalProcessor(image_processor=Phi4MultimodalImageProcessor(),
                                        audio_processor=Phi4MultimodalFeatureExtractor(), tokenizer=tok,
                                        chat_template=PHI4_MM_STYLE)
    processor.save_pretrained(out)
    return out


# meta-llama/Llama-3.2-11B-Vision-Instruct, cut to its shape: the turn headers, images where they stand among the
# texts as "<|image|>", and the default system turn only for a conversation without images
LLAMA_3_VISION_STYLE = (
    "{{- bos_token }}{%- set ns = namespace(has_images=false) %}"
    "{%- for message in messages %}{%- if message['content'] is not string %}"
    "{%- for content in message['content'] %}{%- if content['type'] == 'image' %}{%- set ns.has_images = true %}"
    "{%- endif %}{%- endfor %}{%- endif %}{%- endfor %}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- if system_message is not string %}{%- set system_message = system_message[0]['text'] %}{%- endif %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{%- if system_message or not ns.has_images %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system_message + '<|eot_id|>' }}{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}"
    "{%- for content in message['content'] %}{%- if content['type'] == 'image' %}{{- '<|image|>' }}"
    "{%- elif content['type'] == 'text' %}{{- content['text'] }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def build_tiny_mllama(tokenizer_dir: Path, out: Path) -> Path:
    """A 4-layer Llama 3.2 Vision decoder (cross-attention at layers 1 and 3) over a tiled ViT (28 px tiles of 7 px
    patches, up to 4 tiles, 2 local layers with both kept as intermediate features, 1 gated global layer);
    SmolLM2's tokenizer plus Llama 3's turn tokens and `<|image|>`, whose id is the text vocabulary's size, as in
    the hub's checkpoints (the embedding table has 8 rows past the vocabulary)."""
    from transformers import AutoTokenizer, MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor

    try:
        from transformers import MllamaImageProcessor
    except ImportError:  # pragma: no cover
        from transformers import MllamaImageProcessorFast as MllamaImageProcessor

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = len(tok)
    tok.add_special_tokens({"bos_token": "<|begin_of_text|>", "additional_special_tokens": [
        "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tok = AutoTokenizer.from_pretrained(_save_tokenizer(tok, out), extra_special_tokens={"image_token": "<|image|>"})
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
                  image_size=28, patch_size=7, max_num_tiles=4, intermediate_layers_indices=[0, 1],
                  vision_output_dim=96, norm_eps=1e-5)
    text = dict(vocab_size=len(tok) - 1, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                cross_attention_layers=[1, 3], num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=2048, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                bos_token_id=tok.bos_token_id, eos_token_id=tok.convert_tokens_to_ids("<|eot_id|>"),
                pad_token_id=2, tie_word_embeddings=False)
    assert tok.image_token_id == text["vocab_size"] and vocab < text["vocab_size"]
    config = MllamaConfig(vision_config=vision, text_config=text, image_token_index=tok.image_token_id)
    save_random_vl(MllamaForConditionalGeneration, config, 2024, out)
    # the scalar tanh gates (cross-attention, tile and position embeddings, global layers) opened wide, or the
    # images would barely move the logits
    with torch.no_grad():
        model = MllamaForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
        for name, p in model.named_parameters():
            if "gate" in name and p.numel() == 1:
                p.fill_(0.8)
        model.save_pretrained(out)
    image_processor = MllamaImageProcessor(size={"height": 28, "width": 28}, max_image_tiles=4)
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tok, chat_template=LLAMA_3_VISION_STYLE)
    processor.save_pretrained(out)
    return out


def _save_tokenizer(tok, out: Path) -> Path:
    """`tok` saved beside `out`, to reload it with named special tokens added after the ones just added."""
    folder = out.parent / f"{out.name}_tokenizer"
    tok.save_pretrained(folder)
    return folder
