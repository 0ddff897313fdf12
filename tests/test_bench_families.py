"""Issue 17's family benchmark (mmserve.bench.families) on the CPU: each family's preset writes a folder that
mmserve's processor and transformers' AutoProcessor both load offline and that tokenise a chat prompt with one image
alike, at the real model's image tokens and parameter count (counted on the meta device, nothing allocated); and the
benchmark runs end to end on a tiny override of one preset, transformers included."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from mmserve.bench import families
from mmserve.bench.presets import VISION_TOKENS, write_preset

# (preset, image tokens of a 448x448 image, parameters of the real model; LLaVA's include the vocabulary grown
# from 32,064 to the test tokenizer's 49,216: 7.06B on the hub)
FAMILIES = [("llava-1.5-7b", 576, 7.204e9), ("gemma-3-12b", 256, 12.19e9), ("mistral-small-3.1-24b", 256, 24.01e9),
            ("internvl3-8b", 256, 7.944e9)]


@pytest.mark.parametrize(("preset", "image_tokens", "params"), FAMILIES)
def test_family_preset_folder_loads_in_both_processors(preset, image_tokens, params, tokenizer_dir, tmp_path):
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from mmserve.config import ServerArgs
    from mmserve.tokenizer.manager import _model_config_and_processor

    folder = write_preset(preset, tokenizer_dir, tmp_path / preset)
    config = AutoConfig.from_pretrained(folder)
    hf = AutoProcessor.from_pretrained(folder)
    tokenizer = hf.tokenizer
    for key, token in VISION_TOKENS[preset].ids.items():
        if key != "pad_token_id":
            assert json.loads((folder / "config.json").read_text())[key] == tokenizer.convert_tokens_to_ids(token)
    assert config.text_config.vocab_size >= len(tokenizer)
    _, ours = _model_config_and_processor(ServerArgs(model_path=str(folder)))
    assert ours is not None

    layout = families.chat_layout(str(folder))
    assert layout.count("{text}") == 1
    prompt = layout.replace("{text}", "what is in this picture?")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (448, 448, 3), dtype=np.uint8))
    ids, _ = ours.process(prompt, [("image", image)])
    hf_ids = hf(text=[prompt], images=[[image]], return_tensors="pt")["input_ids"][0].tolist()
    assert ids == hf_ids
    assert ids.count(config.image_token_id) == image_tokens
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=0.005)


def test_qwen_presets_keep_qwen_vision_tokens(tokenizer_dir, tmp_path):
    folder = write_preset("qwen2.5-vl-7b", tokenizer_dir, tmp_path / "qwen")
    config = json.loads((folder / "config.json").read_text())
    assert config["vocab_size"] == 152064 and config["image_token_id"] == 49152 + 3  # <|image_pad|>, the 4th added


# 2 layers and small widths under the preset's processor, so the run takes seconds
_TINY_LLAVA = {"text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                               "num_attention_heads": 4, "num_key_value_heads": 2},
               "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                 "num_attention_heads": 2, "projection_dim": 32}}


def test_benchmark_prints_the_family_row(tokenizer_dir, tmp_path, capsys):
    out_json = tmp_path / "families.json"
    families.main(["--preset", "llava-1.5-7b", "--tokenizer-dir", str(tokenizer_dir), "--config-override",
                   json.dumps(_TINY_LLAVA), "--requests", "3", "--output-len", "3", "--text-words", "5",
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
    assert "USER: <image>\\n{text} ASSISTANT:" in out  # the prompt is LLaVA's template around the image
    assert "command: python -m mmserve.bench.families --preset llava-1.5-7b" in out and "UTC" in out
    assert out.index("mmserve: warm-up") < out.index("transformers: loading") < out.index("\nid ")

    records = {r["id"]: r for r in json.loads(out_json.read_text())["rows"]}
    tokens = records["F2"]["prompt_tokens"]
    assert tokens > 576 and records["F1"]["prompt_tokens_mean"] == tokens  # 576 image tokens and the text
    assert records["F1"]["transformers"]["median"] > 0 and records["F2"]["ratio"] > 0
