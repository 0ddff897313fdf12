"""The fast-path benchmark (mmserve.bench.fastpath) end to end on the CPU at tiny sizes: every row is printed with
numbers, the transformers reference fills its rows, and the JSON holds the same table."""

from __future__ import annotations

import json
import re

from mmserve.bench import fastpath

_TINY = ["--runs", "1", "--hf-runs", "1", "--hf-batch-size", "2", "--copy-mib", "8", "--t1-input-len", "12",
         "--t1-output-len", "6", "--t1p-input-len", "16", "--t2-prompts", "4", "--t2-input-len", "10",
         "--t2-output-len", "3", "--t3-prompts", "3", "--t3-input-len", "8", "--t3-output-len", "4",
         "--dtype", "float32", "--device", "cpu", "--log-level", "warning"]


def test_every_row_is_measured_and_written(tiny_model_dir, tmp_path, capsys):
    out_json = tmp_path / "fastpath.json"
    fastpath.main(["--model-path", str(tiny_model_dir("llama")), "--json", str(out_json), *_TINY])
    out = capsys.readouterr().out
    table = out[out.index("\nid "):]
    for row_id in fastpath.ROW_IDS:
        line = next(line for line in table.splitlines() if line.startswith(f"{row_id} "))
        mmserve_cell = line.split(" | ")[2]
        assert re.match(r"[\d,]+\.?\d* ", mmserve_cell), line
    for row_id in ("T1", "T2"):  # the transformers reference ran, and its ratio is shown
        line = next(line for line in table.splitlines() if line.startswith(f"{row_id} "))
        hf_cell, ratio_cell = (c.strip() for c in line.split(" | ")[3:5])
        assert re.fullmatch(r"[\d,]+\.?\d* tok/s", hf_cell) and re.fullmatch(r"\d+\.\d\d×", ratio_cell), line
    assert "% of floor" in table and "ratio" in table and "UTC" in table
    assert out.index("floor: copying") < out.index("mmserve: warm-up") < out.index("T1: batch 1") < \
        out.index("transformers: loading") < out.index("\nid ")

    data = json.loads(out_json.read_text())
    rows = {r["id"]: r for r in data["rows"]}
    assert list(rows) == list(fastpath.ROW_IDS)
    for row in rows.values():
        assert row["mmserve"]["median"] > 0 and row["mmserve"]["min"] <= row["mmserve"]["max"]
        assert set(row) >= {"workload", "unit", "transformers", "ratio", "target", "met"}
    assert rows["floor"]["weight_bytes"] > 0 and rows["floor"]["met"] is None
    assert rows["T1"]["transformers"]["median"] > 0 and rows["T1"]["ratio"] > 0
    assert rows["T2"]["transformers"]["median"] > 0 and rows["T3"]["transformers"] is None
    assert rows["T1p"]["seen"]["median"] > 0 and rows["T1p"]["unseen_lengths"] == [15]
    assert isinstance(rows["T3"]["met"], bool)
    assert data["env"]["dtype"] == "float32" and data["env"]["device"].startswith("CPU")


def test_only_picks_rows_and_floor_always_runs(tiny_model_dir, capsys):
    fastpath.main(["--model-path", str(tiny_model_dir("llama")), "--only", "t1p", "--no-hf", *_TINY])
    table = capsys.readouterr().out.split("\nid ")[1]
    body = table.split("\n  ")[0].splitlines()[2:]  # below the header and its rule, above the notes
    ids = [line.split(" ")[0] for line in body]
    assert ids == ["floor", "T1p"]


def test_unseen_lengths_avoid_the_seen_ones():
    assert list(fastpath.unseen_lengths(128, 3, {128, 256, 512})) == [120, 127, 134]
    assert list(fastpath.unseen_lengths(16, 2, {8, 16})) == [15, 22]
