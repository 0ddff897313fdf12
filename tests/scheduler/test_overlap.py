"""Overlap scheduling: a decode step launched before the previous one's ids are read gives the same outputs, and
the KV bookkeeping stays exact (the extra step a finishing request rides along in, aborts, prefills arriving
between decode steps, a small pool).

On the CPU nothing runs asynchronously, but the bookkeeping is the same: the tests turn `Scheduler.overlap` on and
compare with it off. On a GPU it is on by default and the same tests compare it with `--disable-overlap-schedule`.
"""

from __future__ import annotations

import json
import re
import threading
import time

from engine_helpers import assert_pool_consistent

from mmserve import Engine

GREEDY = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
PROMPTS = [f"Prompt {i} is about topic {i * 7} and more" for i in range(5)]


def _engine(model_path: str, overlap: bool, **kwargs) -> Engine:
    engine = Engine(model_path=model_path, dtype="float32", disable_overlap_schedule=not overlap, **kwargs)
    engine.scheduler.overlap = overlap  # on the CPU it is off unless asked for
    return engine


def _params() -> list[dict]:
    """Different lengths, a stop string and an EOS-capable request: requests finish at different steps."""
    return [{**GREEDY, "max_new_tokens": 3}, {**GREEDY, "max_new_tokens": 9}, GREEDY,
            {"temperature": 0, "max_new_tokens": 12, "stop": ["e"]}, {"temperature": 0, "max_new_tokens": 6}]


def test_overlap_gives_the_same_outputs(model_path):
    results = {}
    for overlap in (False, True):
        with _engine(model_path, overlap) as engine:
            out = engine.generate(PROMPTS, _params())
            again = engine.generate(PROMPTS[1], GREEDY)  # behind the prefix cache that the overlapped steps filled
            results[overlap] = ([(r["output_ids"], r["text"], r["meta_info"]["finish_reason"]) for r in out],
                                again["output_ids"], again["meta_info"]["cached_tokens"])
            assert (engine.scheduler.stats.overlapped_steps > 10) == overlap
            assert engine.scheduler._inflight is None
            assert_pool_consistent(engine)
    assert results[True] == results[False]


def test_overlap_under_a_small_pool_and_few_rows(model_path):
    """Too few slots or rows for everyone: chaining stops where a step needs eviction or retraction, and goes
    on while requests wait for a free row."""
    outs = {}
    for overlap in (False, True):
        for kwargs in ({"max_total_tokens": 48}, {"max_running_requests": 2}):
            with _engine(model_path, overlap, **kwargs) as engine:
                outs[overlap, str(kwargs)] = [r["output_ids"] for r in engine.generate(PROMPTS, GREEDY)]
                if overlap and "max_running_requests" in kwargs:  # waiting requests do not stop the chaining
                    assert engine.scheduler.stats.overlapped_steps >= 10
                assert_pool_consistent(engine)
    assert len(set(map(str, outs.values()))) == 1


def test_requests_arriving_and_aborting_while_steps_are_in_flight(model_path):
    """A request submitted while others decode joins (the in-flight step is read first); a stream closed early
    is aborted wherever it stands; sampled requests without a seed also run ahead; the pool ends clean."""
    with _engine(model_path, True) as engine:
        long = {**GREEDY, "max_new_tokens": 40}
        results = {}

        def run(key: str, prompt: str, params: dict) -> None:
            results[key] = engine.generate(prompt, params)

        first = threading.Thread(target=run, args=("a", PROMPTS[0], long))
        first.start()
        time.sleep(0.05)
        second = threading.Thread(target=run, args=("b", PROMPTS[1], {"temperature": 0.8, "max_new_tokens": 20,
                                                                        "ignore_eos": True}))
        second.start()
        stream = engine.generate(PROMPTS[2], long, stream=True)
        next(stream)
        next(stream)
        stream.close()  # aborted mid-way
        first.join()
        second.join()
        deadline = time.monotonic() + 10
        while engine.scheduler.has_work() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(results["a"]["output_ids"]) == 40 and len(results["b"]["output_ids"]) == 20
        assert engine.scheduler.stats.overlapped_steps > 20
        assert_pool_consistent(engine)
        with _engine(model_path, False) as plain:
            assert plain.generate(PROMPTS[0], long)["output_ids"] == results["a"]["output_ids"]


def test_what_cannot_run_ahead_waits(model_path):
    """Log-probs, penalties, seeds and min_new_tokens need each step's ids first: same results either way."""
    params = [{**GREEDY, "logprobs": True, "top_logprobs_num": 2}, {**GREEDY, "repetition_penalty": 1.3},
              {"temperature": 0.9, "seed": 5, "max_new_tokens": 8}, {"temperature": 0, "max_new_tokens": 8,
                                                                     "min_new_tokens": 6}]
    outs = {}
    for overlap in (False, True):
        with _engine(model_path, overlap) as engine:
            outs[overlap] = [(r["output_ids"], r["meta_info"].get("output_token_logprobs"))
                             for r in engine.generate(PROMPTS[:4], params)]
            assert engine.scheduler.stats.overlapped_steps == 0  # every batch held a row that must wait
            assert_pool_consistent(engine)
    assert [ids for ids, _ in outs[True]] == [ids for ids, _ in outs[False]]
    # log-probs of the same tokens, computed by two engine instances: equal up to float32 rounding (the CPU
    # kernels' summation order may differ between allocations; a CI run saw 1e-6)
    for (_, got), (_, want) in zip(outs[True], outs[False], strict=True):
        assert (got is None) == (want is None)
        for (lp_got, tok_got), (lp_want, tok_want) in zip(got or [], want or [], strict=True):
            assert tok_got == tok_want and abs(lp_got - lp_want) < 1e-5


def test_grammar_requests_overlap_with_the_same_outputs(model_path):
    """A grammar's next mask follows the previous token: a chained step reads it after launching its forward and
    before sampling. Greedy rows with a regex and a JSON schema give the same tokens as without overlap, beside a
    sampled row with a schema (valid either way) and a free one."""
    schema = ('{"type": "object", "properties": {"a": {"enum": ["x", "yy"]}, "b": {"type": "array", "items": '
              '{"type": "boolean"}, "minItems": 2, "maxItems": 6}}, "required": ["a", "b"]}')
    regex = "(ab|cd){2,6} [0-9]{3,6}"
    params = [{"temperature": 0, "max_new_tokens": 40, "regex": regex},
              {"temperature": 0, "max_new_tokens": 60, "json_schema": schema},
              {"temperature": 1.0, "max_new_tokens": 60, "json_schema": schema}, {**GREEDY, "max_new_tokens": 30}]
    results = {}
    for overlap in (False, True):
        with _engine(model_path, overlap) as engine:
            out = engine.generate(PROMPTS[:4], params)
            results[overlap] = [(r["output_ids"], r["meta_info"]["finish_reason"]) for r in (out[0], out[1], out[3])]
            assert re.fullmatch(regex, out[0]["text"]), out[0]["text"]
            for r in out[1:3]:
                json.loads(r["text"])
            assert (engine.scheduler.stats.overlapped_steps > 5) == overlap, engine.scheduler.stats
            assert_pool_consistent(engine)
    assert results[True] == results[False]
