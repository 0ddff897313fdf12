"""Constrained decoding on the engine (tiny random model, SmolLM2's tokenizer, CPU): sampled at temperature 1 over
many seeds, every output parses and validates against its JSON schema, full-matches its regex, follows its EBNF;
different grammars and none share a batch; greedy outputs survive the prefix cache and retraction unchanged; an
image prompt follows a schema too; bad grammars are refused with the problem named."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from vl_helpers import IMAGE, picture

from mmserve import Engine
from mmserve.sampling_params import SamplingParams

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6},
    "ok": {"type": "boolean"},
    "size": {"enum": ["small", "large"]},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
    "required": ["name", "ok", "size"]}
REGEX = r"(yes|no), [0-9]{1,3}!"
EBNF = 'root ::= "(" item ("," item)? ")"\nitem ::= [a-c] | "x" [0-9]'
PROMPTS = [f"Describe item {i} of the catalogue." for i in range(12)]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    with Engine(model_path=str(tiny_model_dir("qwen2")), dtype="float32") as e:
        yield e


def sampled(seed: int, **grammar) -> dict:
    return {"temperature": 1.0, "max_new_tokens": 80, "seed": seed, **grammar}


def test_json_schema_outputs_validate(engine):
    outs = engine.generate(PROMPTS, [sampled(i, json_schema=json.dumps(SCHEMA)) for i in range(len(PROMPTS))])
    texts = {o["text"] for o in outs}
    assert len(texts) > 3  # the seeds give different objects: the mask constrains, it does not pick
    for out in outs:
        assert out["meta_info"]["finish_reason"]["type"] == "stop", out
        jsonschema.validate(json.loads(out["text"]), SCHEMA)


def test_regex_and_ebnf_outputs_match(engine):
    outs = engine.generate(PROMPTS, [sampled(i, regex=REGEX) for i in range(len(PROMPTS))])
    for out in outs:
        assert re.fullmatch(REGEX, out["text"]), out["text"]
    outs = engine.generate(PROMPTS, [sampled(i, ebnf=EBNF) for i in range(len(PROMPTS))])
    for out in outs:
        assert re.fullmatch(r"\((?:[a-c]|x[0-9])(?:,(?:[a-c]|x[0-9]))?\)", out["text"]), out["text"]


def test_grammars_and_free_rows_in_one_batch(engine):
    params = [sampled(0, json_schema=SCHEMA), sampled(1, regex=REGEX), sampled(2), {"temperature": 0,
              "max_new_tokens": 12, "ignore_eos": True}, sampled(4, ebnf=EBNF)]
    alone = [engine.generate(p, s) for p, s in zip(PROMPTS, params, strict=False)]
    together = engine.generate(PROMPTS[:len(params)], params)
    assert [o["text"] for o in together] == [o["text"] for o in alone]  # seeded rows: independent of the batch
    jsonschema.validate(json.loads(together[0]["text"]), SCHEMA)
    assert re.fullmatch(REGEX, together[1]["text"])
    assert len(together[3]["output_ids"]) == 12  # the free greedy row ran its full length


def test_greedy_output_survives_prefix_cache_and_retraction(tiny_model_dir, engine):
    greedy = {"temperature": 0, "max_new_tokens": 40, "json_schema": json.dumps(SCHEMA)}
    first = engine.generate(PROMPTS[0], greedy)
    again = engine.generate(PROMPTS[0], greedy)
    assert again["meta_info"]["cached_tokens"] > 0
    assert again["text"] == first["text"]
    expected = [engine.generate(p, greedy)["text"] for p in PROMPTS[:4]]
    with Engine(model_path=str(tiny_model_dir("qwen2")), dtype="float32", max_total_tokens=64) as small:
        outs = small.generate(PROMPTS[:4], greedy)
        assert small.scheduler.stats.retractions > 0
    assert [o["text"] for o in outs] == expected


def test_an_image_prompt_follows_the_schema(tiny_qwen2_vl_dir):
    with Engine(model_path=str(tiny_qwen2_vl_dir), dtype="float32") as e:
        outs = e.generate([f"{IMAGE}What is in it?"] * 4, [sampled(i, json_schema=SCHEMA) for i in range(4)],
                          image_data=[picture(64, 48, i) for i in range(4)])
    for out in outs:
        jsonschema.validate(json.loads(out["text"]), SCHEMA)


def test_bad_grammars_are_refused(engine):
    with pytest.raises(ValueError, match="invalid json_schema"):
        engine.generate("x", {"json_schema": '{"type": "nope"}'})
    with pytest.raises(ValueError, match="invalid regex"):
        engine.generate("x", {"regex": "(ab"})
    with pytest.raises(ValueError, match="exclusive"):
        SamplingParams.from_dict({"regex": "a", "ebnf": 'root ::= "a"'})
    with pytest.raises(ValueError, match="json_schema must be a JSON schema"):
        SamplingParams.from_dict({"json_schema": 3})
    assert SamplingParams.from_dict({"json_schema": {"type": "object"}}).json_schema == '{"type": "object"}'
