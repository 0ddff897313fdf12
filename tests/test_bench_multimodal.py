"""The multimodal benchmark (mmserve.bench.multimodal) end to end on the CPU at tiny sizes: every row is printed with
numbers, the transformers reference fills its rows, the JSON holds the same table, a mixture of experts names the
throughput row V4; and the vision-language presets write folders that both processors load offline, at the real
models' sizes."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from mmserve.bench import multimodal
from mmserve.bench.presets import QWEN_VISION_TOKENS, write_preset

_TINY = ["--runs", "1", "--hf-runs", "1", "--hf-batch-size", "2", "--copy-mib", "8", "--v1-prompts", "3",
         "--v1-output-len", "3", "--text-words", "5", "--v2-sizes", "3", "--v3-output-len", "5", "--video-frames", "4",
         "--video-size", "64x48", "--dtype", "float32", "--device", "cpu", "--log-level", "warning"]
# Qwen2.5-VL's tiny processor: 28 px a token, at most 96 tokens an image
_QWEN2_5_SIZES = ["--image-size", "56x56", "--v2-smallest", "56x56", "--v2-largest", "112x84"]
_NUMBER = r"[\d,]+\.?\d*"


def _table_rows(out: str) -> dict[str, list[str]]:
    """The printed table's cells by row id."""
    table = out[out.index("\nid "):].split("\n  ")[0].splitlines()[3:]  # below the header and its rule
    return {line.split(" ")[0]: [c.strip() for c in line.split(" | ")] for line in table}


def test_every_row_is_measured_and_written(tiny_qwen2_5_vl_dir, tmp_path, capsys):
    out_json = tmp_path / "multimodal.json"
    multimodal.main(["--model-path", str(tiny_qwen2_5_vl_dir), "--json", str(out_json), *_TINY, *_QWEN2_5_SIZES])
    out = capsys.readouterr().out
    rows = _table_rows(out)
    assert list(rows) == ["floor", "V1", "V2", "V3", "V5"]
    for row_id, cells in rows.items():
        assert re.match(_NUMBER + " ", cells[2]), cells
        if row_id != "floor":  # the transformers reference ran, and its ratio is shown
            assert re.fullmatch(_NUMBER + r" (req/s|ms|tok/s)", cells[3]) and re.fullmatch(r"\d+\.\d\d×", cells[4])
    assert "prompt tokens each" in rows["V1"][2] and "% of floor" in rows["V3"][2] and "× median" in rows["V2"][2]
    assert rows["V5"][5] == rows["V5"][6] == "—" and rows["V1"][6] in ("yes", "no") and "UTC" in out
    assert out.index("floor: copying") < out.index("mmserve: warm-up") < out.index("V1: 3 × (one 56x56 image") < \
        out.index("V2: time to first token") < out.index("V3: batch 1") < out.index("V5: time to first token") < \
        out.index("transformers: loading") < out.index("transformers V1") < out.index("\nid ")

    data = json.loads(out_json.read_text())
    records = {r["id"]: r for r in data["rows"]}
    assert list(records) == ["floor", "V1", "V2", "V3", "V5"]
    for row in records.values():
        assert row["mmserve"]["median"] > 0 and row["mmserve"]["min"] <= row["mmserve"]["max"]
        assert set(row) >= {"workload", "unit", "transformers", "ratio", "target", "met"}
    for row_id in ("V1", "V2", "V3", "V5"):
        assert records[row_id]["transformers"]["median"] > 0 and records[row_id]["ratio"] > 0
    assert isinstance(records["V1"]["met"], bool) and isinstance(records["V2"]["met"], bool)
    assert records["V5"]["met"] is None and records["V5"]["prompt_tokens"] > 4
    # times: the ratio is transformers' time over ours
    v2 = records["V2"]
    assert v2["ratio"] == pytest.approx(v2["transformers"]["median"] / v2["mmserve"]["median"])
    assert v2["p99_over_median"]["median"] >= 1.0 and v2["seen_size"]["median"] > 0
    [sizes] = v2["sizes"]  # three sizes on the 28 px grid, none with the 56x56 image's 4 tokens
    assert len(sizes) == 3 and all(w % 28 == 0 and h % 28 == 0 for w, h in sizes)
    assert len({w * h for w, h in sizes} | {56 * 56}) == 4
    assert records["V1"]["prompt_tokens_mean"] > 4 and records["V1"]["output_tok_s"]["median"] > 0
    assert data["env"]["dtype"] == "float32" and data["env"]["device"].startswith("CPU")


def test_mixture_of_experts_names_the_throughput_row_v4(tiny_qwen3_vl_moe_dir, capsys):
    multimodal.main(["--model-path", str(tiny_qwen3_vl_moe_dir), "--only", "v1", "--hf-v1-prompts", "2", *_TINY,
                     "--image-size", "64x64"])
    out = capsys.readouterr().out
    rows = _table_rows(out)
    assert list(rows) == ["floor", "V4"]
    assert rows["V4"][1].startswith("V1 workload: 3 × (one 64x64 image") and rows["V4"][5] == "≥ 6× transformers"
    assert re.fullmatch(_NUMBER + " req/s", rows["V4"][3]) and rows["V4"][6] in ("yes", "no")
    assert "transformers V4: 2 prompts" in out and "V2:" not in out.split("\nid ")[1]  # notes of run rows only


def test_only_without_transformers(tiny_qwen2_5_vl_dir, capsys):
    multimodal.main(["--model-path", str(tiny_qwen2_5_vl_dir), "--only", "V2", "--no-hf", *_TINY, *_QWEN2_5_SIZES])
    out = capsys.readouterr().out
    rows = _table_rows(out)
    assert list(rows) == ["floor", "V2"] and rows["V2"][3] == "skipped"
    assert "transformers: loading" not in out


def test_size_ladder_spreads_sizes_and_never_repeats_a_token_count():
    seen = {16 * 16}  # a 448x448 image's tokens
    first = multimodal.size_ladder((224, 224), (896, 672), 20, 28, seen)
    assert first[0] == (224, 224) and first[-1] == (896, 672)
    assert all(w % 28 == 0 and h % 28 == 0 for w, h in first)
    again = multimodal.size_ladder((224, 224), (896, 672), 20, 28, seen)
    cells = [(w // 28) * (h // 28) for w, h in first + again]
    assert len(set(cells)) == 40 and 256 not in cells


@pytest.mark.parametrize(("preset", "image_tokens", "params"), [("qwen2.5-vl-7b", 256, 8.29e9),
                                                                ("qwen3-vl-30b-a3b", 196, 31.07e9)])
def test_vision_preset_folder_loads_offline(preset, image_tokens, params, tokenizer_dir, tmp_path):
    """Both processors load the folder; a 448x448 image is the real model's number of tokens; the config's token
    ids are the tokenizer's; the transformers model of the config has the real model's parameter count."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from mmserve.config import ServerArgs
    from mmserve.multimodal.processor import MultimodalProcessor
    from mmserve.multimodal.processors import ProcessorRegistry

    folder = write_preset(preset, tokenizer_dir, tmp_path / preset)
    config = AutoConfig.from_pretrained(folder)
    hf = AutoProcessor.from_pretrained(folder)
    for key, token in QWEN_VISION_TOKENS.items():
        if hasattr(config, key):
            assert getattr(config, key) == hf.tokenizer.convert_tokens_to_ids(token), key
    ours = MultimodalProcessor(ServerArgs(model_path=str(folder)), ProcessorRegistry.resolve(config.architectures),
                               config, folder)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (448, 448, 3), dtype=np.uint8))
    ids, _ = ours.process(f"<|im_start|>user\n{multimodal.IMAGE}Hi<|im_end|>\n", [("image", image)])
    assert ids.count(config.image_token_id) == image_tokens
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=0.01)
    assert "image_pad" in (folder / "chat_template.jinja").read_text()  # the server's default template takes images


def test_text_preset_still_copies_the_tokenizer(tokenizer_dir, tmp_path):
    folder = write_preset("llama-3.1-8b", tokenizer_dir, tmp_path / "llama")
    assert {f.name for f in tokenizer_dir.iterdir()} <= {f.name for f in folder.iterdir()}
