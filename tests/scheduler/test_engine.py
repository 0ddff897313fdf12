"""The engine's scheduling behaviour end to end on a tiny model: prefix reuse, eviction, policies, abort,
n/seeds, penalties against transformers, logprobs, limits and errors."""

from __future__ import annotations

import gc
import time

import pytest
import torch
from engine_helpers import assert_pool_consistent

from mmserve import Engine

GREEDY = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}


def test_shared_prefix_is_reused_and_outputs_unchanged(engine, model_path):
    prefix = "A shared system prompt that many requests start with, followed by the question: "
    first = engine.generate(prefix + "what is one plus one?", GREEDY)
    second = engine.generate(prefix + "what is two plus two?", GREEDY)
    assert first["meta_info"]["cached_tokens"] == 0
    assert second["meta_info"]["cached_tokens"] >= 15
    again = engine.generate(prefix + "what is one plus one?", GREEDY)
    assert again["meta_info"]["cached_tokens"] == again["meta_info"]["prompt_tokens"] - 1
    with Engine(model_path=model_path, dtype="float32", disable_radix_cache=True) as plain:
        ref = plain.generate([prefix + "what is one plus one?", prefix + "what is two plus two?"], GREEDY)
        assert all(r["meta_info"]["cached_tokens"] == 0 for r in ref)
    assert [first["output_ids"], second["output_ids"]] == [r["output_ids"] for r in ref]
    assert again["output_ids"] == first["output_ids"]
    assert_pool_consistent(engine)


def test_eviction_under_a_small_pool_keeps_outputs(model_path, engine):
    prompts = [f"Prompt number {i} talks about topic {i * 7} in some detail" for i in range(6)]
    expected = engine.generate(prompts, GREEDY)
    with Engine(model_path=model_path, dtype="float32", max_total_tokens=40) as small:
        got = [small.generate(p, GREEDY) for p in prompts]
        assert small.scheduler.tree.total_size() <= 40
        got_again = small.generate(prompts[-1], GREEDY)
        assert got_again["meta_info"]["cached_tokens"] > 0
        first_again = small.generate(prompts[0], GREEDY)  # evicted long ago
        assert_pool_consistent(small)
    assert [g["output_ids"] for g in got] == [e["output_ids"] for e in expected]
    assert got_again["output_ids"] == expected[-1]["output_ids"]
    assert first_again["output_ids"] == expected[0]["output_ids"]


def test_longest_prefix_policy_gives_the_same_outputs(model_path, engine):
    prompts = ["alpha beta gamma delta", "alpha beta gamma delta epsilon zeta", "omega psi chi", "alpha beta"]
    expected = engine.generate(prompts, GREEDY)
    with Engine(model_path=model_path, dtype="float32", schedule_policy="lpm", max_running_requests=2) as lpm:
        got = lpm.generate(prompts, GREEDY)
    assert [g["output_ids"] for g in got] == [e["output_ids"] for e in expected]


def test_stopping_a_stream_early_aborts_and_frees(engine):
    before = engine.scheduler.stats.generated_tokens
    stream = engine.generate("Tell me a long story", {"max_new_tokens": 200, "ignore_eos": True}, stream=True)
    first = next(stream)
    assert first["output_ids"]
    stream.close()  # the consumer walks away
    deadline = time.monotonic() + 10
    while engine.scheduler.has_work() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert_pool_consistent(engine)
    assert engine.scheduler.stats.generated_tokens - before < 200  # it stopped before max_new_tokens


def test_n_samples_with_a_seed_are_reproducible_and_differ(engine):
    params = {"temperature": 1.0, "max_new_tokens": 8, "n": 3, "seed": 42, "ignore_eos": True}
    a = engine.generate("Pick a word:", params)
    b = engine.generate("Pick a word:", params)
    assert len(a) == 3 and [x["output_ids"] for x in a] == [x["output_ids"] for x in b]
    assert len({tuple(x["output_ids"]) for x in a}) > 1


def test_seed_gives_the_same_output_alone_and_inside_a_batch(engine):
    seeded = {"temperature": 0.8, "top_p": 0.9, "max_new_tokens": 10, "seed": 7, "ignore_eos": True}
    alone = engine.generate("The weather today", seeded)
    batch = engine.generate(["Another prompt", "The weather today", "Third one here"],
                            [{"temperature": 1.0, "max_new_tokens": 12, "ignore_eos": True}, seeded, GREEDY])
    assert batch[1]["output_ids"] == alone["output_ids"]


def test_repetition_penalty_matches_transformers(engine, model_path):
    from transformers import AutoModelForCausalLM

    prompt = "the the the cat cat sat on the mat mat"
    out = engine.generate(prompt, {**GREEDY, "max_new_tokens": 12, "repetition_penalty": 1.5})
    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    ids = torch.tensor([engine.tokenizer.encode(prompt)])
    ref = hf.generate(ids, do_sample=False, max_new_tokens=12, repetition_penalty=1.5, eos_token_id=None)
    assert out["output_ids"] == ref[0, ids.shape[1]:].tolist()


def test_logprobs_of_greedy_tokens(engine):
    out = engine.generate("Numbers: one two", {**GREEDY, "logprobs": True, "top_logprobs_num": 3})
    meta = out["meta_info"]
    assert len(meta["output_token_logprobs"]) == len(out["output_ids"]) == 8
    for (logprob, token), top in zip(meta["output_token_logprobs"], meta["output_top_logprobs"], strict=True):
        assert len(top) == 3
        assert top[0][0] == token and top[0][1] == pytest.approx(logprob)
        assert top[0][1] >= top[1][1] >= top[2][1] and logprob <= 0


def test_finish_reasons_and_stop_token_ids(engine):
    out = engine.generate("Count:", {**GREEDY, "max_new_tokens": 5})
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 5}
    stop_at = out["output_ids"][2]
    stopped = engine.generate("Count:", {**GREEDY, "stop_token_ids": [stop_at]})
    assert stopped["output_ids"] == out["output_ids"][: out["output_ids"].index(stop_at) + 1]
    assert stopped["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_at}
    zero = engine.generate("Count:", {"max_new_tokens": 0})
    assert zero["output_ids"] == [] and zero["meta_info"]["completion_tokens"] == 0


def test_invalid_input_raises_value_errors_and_engine_keeps_serving(engine):
    with pytest.raises(ValueError, match="top_p"):
        engine.generate("x", {"top_p": 2.0})
    with pytest.raises(ValueError, match="temperature"):
        engine.generate("x", {"temperature": -1})
    with pytest.raises(ValueError, match="context length"):
        engine.generate(input_ids=[5] * 2000, sampling_params={"max_new_tokens": 1})
    with pytest.raises(ValueError, match="input_ids"):
        engine.generate(input_ids=[10**9], sampling_params={"max_new_tokens": 1})
    with pytest.raises(ValueError, match="messages"):
        engine.chat([])
    assert engine.generate("still alive", GREEDY)["meta_info"]["completion_tokens"] == 8


def test_concurrent_callers_share_batches(engine):
    import threading

    results = {}
    prompts = [f"concurrent request {i}" for i in range(8)]
    expected = engine.generate(prompts, GREEDY)
    steps_before = engine.scheduler.stats.decode_steps

    def call(i):
        results[i] = engine.generate(prompts[i], GREEDY)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i]["output_ids"] for i in range(8)] == [e["output_ids"] for e in expected]
    assert engine.scheduler.stats.decode_steps - steps_before < 8 * 7  # decode steps were shared


def test_chunked_prompt_beside_other_requests_in_a_small_pool(model_path, engine):
    long_prompt = "A long prompt that needs many chunks: " + " ".join(f"word{i}" for i in range(30))
    prompts = [long_prompt, "short one", "another short prompt", "third"]
    expected = engine.generate(prompts, GREEDY)
    with Engine(model_path=model_path, dtype="float32", max_total_tokens=128, chunked_prefill_size=8) as small:
        got = small.generate(prompts, GREEDY)
        assert small.scheduler.stats.prefill_steps >= 10
        assert_pool_consistent(small)
    assert [g["output_ids"] for g in got] == [e["output_ids"] for e in expected]


def test_context_length_beyond_the_model_is_refused(model_path):
    with pytest.raises(ValueError, match="max_position_embeddings"):
        Engine(model_path=model_path, context_length=10**6)


def test_shutdown_frees_the_model(model_path):
    """The weights go when the engine stops, not when the collector next runs (parameters and their layers'
    weight_loader methods form reference cycles): a second engine must not find the first one's on the GPU."""
    import weakref

    engine = Engine(model_path=model_path, dtype="float32")
    weight = weakref.ref(engine.runner.model.model.layers[0].self_attn.qkv_proj.weight)
    gc_was_enabled = gc.isenabled()
    gc.disable()  # so only the engine's own cleanup can free the cycles
    try:
        engine.shutdown()
        assert weight() is None
    finally:
        if gc_was_enabled:
            gc.enable()



@pytest.mark.parametrize("kv_tokens", [None, 24])
def test_warm_up_leaves_nothing_behind(model_path, kv_tokens):
    """The start-up warm-up (run on GPUs) puts prompts through every kind of step, then empties the prefix cache
    and the counters; its prompts fit a small cache too."""
    from mmserve.config import ServerArgs
    from mmserve.engine_core import EngineCore

    core = EngineCore(ServerArgs(model_path=model_path, dtype="float32", max_total_tokens=kv_tokens))
    ran = core.warm_up()
    assert ran.prefill_steps >= 6 and ran.decode_steps >= 3
    assert ran.cached_tokens > 0 or kv_tokens  # a small cache may have evicted the prefix before its reuse
    sched, runner = core.scheduler, core.runner
    assert not sched.has_work() and sched.tree.total_size() == 0
    assert sched.stats.generated_tokens == sched.stats.prompt_tokens == sched.stats.steps == 0
    assert runner.kv_pool.available_size() == runner.kv_pool.size
    assert runner.req_to_token_pool.available_size() == runner.req_to_token_pool.size
