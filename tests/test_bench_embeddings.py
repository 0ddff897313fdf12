"""Issue 21's embedding benchmark (mmserve.bench.embeddings) on the CPU: the gte-Qwen2-1.5B preset is served as an
embedder at the real parameter count (counted on the meta device), and the benchmark runs end to end on a tiny
override of it, transformers included, on the same weights (their embeddings agree)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from mmserve.bench import embeddings
from mmserve.bench.presets import write_preset
from mmserve.config import ServerArgs, is_embedding_model


def test_gte_preset_is_an_embedder_of_the_real_size(tokenizer_dir, tmp_path):
    from transformers import AutoConfig, AutoModel

    folder = write_preset("gte-qwen2-1.5b", tokenizer_dir, tmp_path / "gte")
    config = AutoConfig.from_pretrained(folder)
    assert is_embedding_model(ServerArgs(model_path=str(folder)), config)
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    assert type(model).__name__ == "Qwen2Model"
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(1.544e9, rel=0.005)  # 1.54B on the hub


# 2 layers and small widths, so the run takes seconds
_TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 1024}


def test_benchmark_prints_the_embedding_row(tokenizer_dir, tmp_path, capsys):
    out_json = tmp_path / "embeddings.json"
    embeddings.main(["--preset", "gte-qwen2-1.5b", "--tokenizer-dir", str(tokenizer_dir), "--config-override",
                     json.dumps(_TINY), "--sequences", "6", "--input-len", "16", "--runs", "2", "--hf-batch-size",
                     "4", "--copy-mib", "8", "--json", str(out_json), "--dtype", "float32", "--device", "cpu",
                     "--log-level", "warning"])
    out = capsys.readouterr().out
    table = out[out.index("\nid "):].split("\n  ")[0].splitlines()[3:]
    rows = {line.split(" ")[0]: [c.strip() for c in line.split(" | ")] for line in table}
    assert list(rows) == ["floor", "E1"]
    number = r"[\d,]+\.?\d*"
    assert rows["E1"][1] == "6 × 16 tokens, one encode call"
    assert re.fullmatch(rf"{number} \[{number}–{number}\] seq/s, {number} tok/s", rows["E1"][2])
    assert re.fullmatch(f"{number} seq/s", rows["E1"][3]) and re.fullmatch(r"\d+\.\d\d×", rows["E1"][4])
    assert "command: python -m mmserve.bench.embeddings --preset gte-qwen2-1.5b" in out and "UTC" in out
    assert out.index("mmserve: warm-up") < out.index("transformers: loading") < out.index("\nid ")

    report = json.loads(out_json.read_text())
    record = {r["id"]: r for r in report["rows"]}["E1"]
    assert record["dimensions"] == 64 and len(record["mmserve"]["runs"]) == 2
    assert record["transformers"]["median"] > 0 and record["ratio"] > 0
    # both sides ran the same weights: transformers' random ones, saved for the engine to load
    cosines = report["env"]["cosine_vs_transformers"]
    assert len(cosines) == 4 and min(cosines) >= 1 - 1e-5
    saved = re.search(r"saving them to (\S+)", out)
    assert saved is not None and not Path(saved.group(1)).exists()  # a real shape's are gigabytes: removed


def test_no_hf_keeps_random_weights_and_skips_the_reference(tokenizer_dir, capsys):
    embeddings.main(["--preset", "gte-qwen2-1.5b", "--tokenizer-dir", str(tokenizer_dir), "--config-override",
                     json.dumps(_TINY), "--sequences", "2", "--input-len", "8", "--runs", "1", "--no-hf",
                     "--copy-mib", "8", "--dtype", "float32", "--device", "cpu", "--log-level", "warning"])
    out = capsys.readouterr().out
    e1 = next(line for line in out.splitlines() if line.startswith("E1 "))
    assert e1.split(" | ")[3].strip() == "skipped"
    assert "transformers: loading" not in out and "cosine" not in out
    assert "transformers: drawing random weights" not in out  # the engine's own random weights: nothing saved
