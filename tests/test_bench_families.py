"""Issue 17's and issue 20's family benchmark (mmserve.bench.families) on the CPU: each family's preset writes a
folder that mmserve's processor and transformers' AutoProcessor both load offline and that tokenise a chat prompt
with one image alike, at the real model's image tokens and parameter count (counted on the meta device, nothing
allocated, in the class the benchmark's transformers side builds); and the benchmark runs end to end on a tiny
override of each preset, transformers included."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from mmserve.bench import families
from mmserve.bench.offline import hf_auto_class
from mmserve.bench.presets import VISION_TOKENS, write_preset

# (preset, image tokens of a 448x448 image, parameters of the real model; LLaVA's include the vocabulary grown
# from 32,064 to the test tokenizer's 49,216: 7.06B on the hub). Llama 3.2 Vision's image is one token (its tiles
# go to cross-attention); Phi-4's is a 448 px crop and the global view; transformers' Phi-4-multimodal has no LoRA
# adapters (5.6B on the hub with them), and the Qwen3-Omni preset is its thinker alone.
FAMILIES = [("llava-1.5-7b", 576, 7.204e9), ("gemma-3-12b", 256, 12.19e9), ("mistral-small-3.1-24b", 256, 24.01e9),
            ("internvl3-8b", 256, 7.944e9), ("glm-4.1v-9b", 256, 10.29e9), ("glm-4.5v", 256, 107.7e9),
            ("llama-3.2-11b-vision", 1, 10.67e9), ("phi-4-multimodal", 545, 4.744e9),
            ("qwen3-omni-30b-a3b", 196, 31.72e9)]


def _nested(holder, key: str):
    """A dotted key's value ("vision_config.image_token_id") in a config dict or object."""
    for part in key.split("."):
        holder = holder[part] if isinstance(holder, dict) else getattr(holder, part)
    return holder


@pytest.mark.parametrize(("preset", "image_tokens", "params"), FAMILIES)
def test_family_preset_folder_loads_in_both_processors(preset, image_tokens, params, tokenizer_dir, tmp_path):
    from transformers import AutoConfig, AutoProcessor

    from mmserve.config import ServerArgs
    from mmserve.tokenizer.manager import _model_config_and_processor

    folder = write_preset(preset, tokenizer_dir, tmp_path / preset)
    config = AutoConfig.from_pretrained(folder)
    hf = AutoProcessor.from_pretrained(folder)
    tokenizer = hf.tokenizer
    written = json.loads((folder / "config.json").read_text())
    for key, token in VISION_TOKENS[preset].ids.items():
        if key != "pad_token_id":
            assert _nested(written, key) == _nested(config, key) == tokenizer.convert_tokens_to_ids(token)
    assert config.get_text_config().vocab_size >= len(tokenizer)
    _, ours = _model_config_and_processor(ServerArgs(model_path=str(folder)))
    assert ours is not None

    layout = families.chat_layout(str(folder))
    assert layout.count("{text}") == 1
    prompt = layout.replace("{text}", "what is in this picture?")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (448, 448, 3), dtype=np.uint8))
    ids, _ = ours.process(prompt, [("image", image)])
    hf_ids = hf(text=[prompt], images=[[image]], return_tensors="pt")["input_ids"][0].tolist()
    assert ids == hf_ids
    # Phi-4-multimodal keeps its image token's id in the tower's config
    image_token_id = getattr(config, "image_token_id", None) or config.vision_config.image_token_id
    assert ids.count(image_token_id) == image_tokens
    with torch.device("meta"):
        model = hf_auto_class(config).from_config(config)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=0.005)


def test_qwen_presets_keep_qwen_vision_tokens(tokenizer_dir, tmp_path):
    folder = write_preset("qwen2.5-vl-7b", tokenizer_dir, tmp_path / "qwen")
    config = json.loads((folder / "config.json").read_text())
    assert config["vocab_size"] == 152064 and config["image_token_id"] == 49152 + 3  # <|image_pad|>, the 4th added


# 2 layers (Llama 3.2 Vision: 4, cross-attention at 1 and 3), small widths and few experts under the preset's real
# processor, so a run takes seconds; rotary bands and LongRoPE factors shrink with the heads
_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2}
_TOWER = {"depth": 2, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64, "out_hidden_size": 64}
_GLM_BANDS = {"rope_scaling": {"mrope_section": [2, 1, 1]}}
TINY = {
    "llava-1.5-7b": {"text_config": _TEXT, "vision_config": {"hidden_size": 32, "intermediate_size": 64,
                                                             "num_hidden_layers": 2, "num_attention_heads": 2,
                                                             "projection_dim": 32}},
    "glm-4.1v-9b": {"text_config": {**_TEXT, **_GLM_BANDS}, "vision_config": _TOWER},
    "glm-4.5v": {"text_config": {**_TEXT, **_GLM_BANDS, "head_dim": 16, "moe_intermediate_size": 32,
                                 "n_routed_experts": 8, "num_experts_per_tok": 2},
                 "vision_config": _TOWER},
    "llama-3.2-11b-vision": {
        "text_config": {**_TEXT, "num_hidden_layers": 4, "cross_attention_layers": [1, 3]},
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_global_layers": 1,
                          "attention_heads": 2, "intermediate_layers_indices": [0, 1], "vision_output_dim": 96}},
    "phi-4-multimodal": {
        **_TEXT, "rope_scaling": {"short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5], "long_factor": [1.0] * 6},
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
        "audio_config": {"hidden_size": 32, "intermediate_size": 48, "num_blocks": 1, "num_attention_heads": 2,
                         "ext_pw_out_channel": 32, "depthwise_separable_out_channel": 32, "nemo_conv_channels": 8}},
    "qwen3-omni-30b-a3b": {
        "text_config": {**_TEXT, "head_dim": 16, "moe_intermediate_size": 48, "num_experts": 8,
                        "num_experts_per_tok": 2, "rope_scaling": {"mrope_section": [4, 2, 2]}},
        "vision_config": {**_TOWER, "depth": 3, "deepstack_visual_indexes": [0, 2]},
        "audio_config": {"encoder_layers": 2, "encoder_attention_heads": 2, "encoder_ffn_dim": 64, "d_model": 32,
                         "output_dim": 64, "downsample_hidden_size": 8}},
}
# (preset, its prompt's layout as the log shows it, image tokens in the prompt)
BENCH = [("llava-1.5-7b", "USER: <image>\\n{text} ASSISTANT:", 576),
         ("glm-4.1v-9b", "<|user|>\\n<|begin_of_image|><|image|><|end_of_image|>{text}<|assistant|>\\n'", 256),
         ("glm-4.5v", "<|begin_of_image|><|image|><|end_of_image|>{text}<|assistant|>'", 256),
         ("llama-3.2-11b-vision", "<|start_header_id|>user<|end_header_id|>\\n\\n<|image|>{text}<|eot_id|>", 1),
         ("phi-4-multimodal", "'<|user|><|image|>{text}<|end|><|assistant|>'", 545),
         ("qwen3-omni-30b-a3b", "<|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>{text}<|im_end|>", 196)]


@pytest.mark.parametrize(("preset", "layout", "image_tokens"), BENCH, ids=[case[0] for case in BENCH])
def test_benchmark_prints_the_family_row(preset, layout, image_tokens, tokenizer_dir, tmp_path, capsys):
    out_json = tmp_path / "families.json"
    families.main(["--preset", preset, "--tokenizer-dir", str(tokenizer_dir), "--config-override",
                   json.dumps(TINY[preset]), "--requests", "3", "--output-len", "3", "--text-words", "5",
                   "--ttft-images", "2", "--runs", "1", "--hf-batch-size", "2", "--copy-mib", "8", "--json",
                   str(out_json), "--dtype", "float32", "--device", "cpu", "--log-level", "warning"])
    out = capsys.readouterr().out
    table = out[out.index("\nid "):].split("\n  ")[0].splitlines()[3:]
    rows = {line.split(" ")[0]: [c.strip() for c in line.split(" | ")] for line in table}
    assert list(rows) == ["floor", "F1", "F2"]
    number = r"[\d,]+\.?\d*"
    assert rows["F1"][1] == "3 × (one 448x448 image + 5 words), 3 out, all at once"
    assert re.fullmatch(number + r" req/s, \d+ prompt tokens each", rows["F1"][2])
    assert re.fullmatch(number + r" ms, \d+ prompt tokens", rows["F2"][2])
    for row_id, unit in (("F1", "req/s"), ("F2", "ms")):  # transformers ran on the same folder
        assert re.fullmatch(f"{number} {unit}", rows[row_id][3]) and re.fullmatch(r"\d+\.\d\d×", rows[row_id][4])
    assert layout in out  # the prompt is the family's template around its image placeholder
    assert f"command: python -m mmserve.bench.families --preset {preset}" in out and "UTC" in out
    assert out.index("mmserve: warm-up") < out.index("transformers: loading") < out.index("\nid ")

    records = {r["id"]: r for r in json.loads(out_json.read_text())["rows"]}
    tokens = records["F2"]["prompt_tokens"]
    assert tokens > image_tokens and records["F1"]["prompt_tokens_mean"] == tokens  # the image's tokens and the text
    assert records["F1"]["transformers"]["median"] > 0 and records["F2"]["ratio"] > 0
