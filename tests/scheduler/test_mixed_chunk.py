"""--enable-mixed-chunk: running requests decode in the same step as a prefill chunk. Outputs equal those of
separate prefill and decode steps, for text and for an image prompt (M-RoPE positions of generated tokens), with
requests finishing inside mixed steps, and the KV pool ends clean."""

from __future__ import annotations

from engine_helpers import assert_pool_consistent
from vl_helpers import IMAGE, picture

from mmserve import Engine
from mmserve.config import ServerArgs
from mmserve.engine_core import EngineCore
from mmserve.messages import GenerateRequest

GREEDY = {"temperature": 0, "ignore_eos": True}


def _run_core(model_path: str, mixed: bool) -> tuple[dict[str, list[int]], int]:
    """Two short requests start decoding; a long one arrives and is prefilled in chunks of 8 beside them; one
    of the short ones finishes during those chunks."""
    core = EngineCore(ServerArgs(model_path=model_path, dtype="float32", chunked_prefill_size=8,
                                 enable_mixed_chunk=mixed))
    tokens: dict[str, list[int]] = {}

    def step() -> None:
        for out in core.step():
            assert out.error_status is None, out.finished_reason
            tokens.setdefault(out.rid, []).extend(out.new_token_ids)

    core.handle(GenerateRequest("a", list(range(200, 206)), {**GREEDY, "max_new_tokens": 3}))
    core.handle(GenerateRequest("b", list(range(300, 305)), {**GREEDY, "max_new_tokens": 12}))
    for _ in range(2):
        step()
    core.handle(GenerateRequest("c", list(range(400, 437)), {**GREEDY, "max_new_tokens": 6}))
    while core.has_work():
        step()
    sched, pool = core.scheduler, core.runner.kv_pool
    assert pool.available_size() + sched.tree.total_size() == pool.size and sched.tree.protected_size() == 0
    return tokens, sched.stats.mixed_steps


def test_mixed_steps_give_the_same_tokens(model_path):
    plain, plain_mixed = _run_core(model_path, mixed=False)
    mixed, mixed_steps = _run_core(model_path, mixed=True)
    assert plain_mixed == 0 and mixed_steps >= 3  # c's five chunks ran beside b (and a, until it finished)
    assert mixed == plain
    assert [len(mixed[r]) for r in "abc"] == [3, 12, 6]


def test_mixed_steps_through_the_engine(model_path):
    """Prompts of different lengths at once: the long ones are chunked while the short ones already decode."""
    prompts = ["Hi", "A somewhat longer prompt that takes a few chunks to prefill, and then some more words",
               "Short one", "Another long prompt which will need several chunks of eight tokens each to finish"]
    params = [{**GREEDY, "max_new_tokens": n} for n in (9, 4, 15, 6)]
    outs = {}
    for mixed in (False, True):
        with Engine(model_path=model_path, dtype="float32", chunked_prefill_size=8, enable_mixed_chunk=mixed) as e:
            outs[mixed] = [r["output_ids"] for r in e.generate(prompts, params)]
            assert (e.scheduler.stats.mixed_steps > 0) == mixed
            assert_pool_consistent(e)
    assert outs[True] == outs[False]


def test_mixed_steps_with_an_image_prompt(tiny_qwen2_vl_dir):
    """A generated token's M-RoPE position (its index plus the request's media offset) in a mixed step."""
    image = picture(90, 60, 5)
    prompts = [f"Describe {IMAGE} briefly.", "A long text prompt without any picture that needs chunks to fill"]
    params = [{**GREEDY, "max_new_tokens": 10}, {**GREEDY, "max_new_tokens": 3}]
    outs = {}
    for mixed in (False, True):
        with Engine(model_path=str(tiny_qwen2_vl_dir), dtype="float32", chunked_prefill_size=8,
                    enable_mixed_chunk=mixed) as e:
            outs[mixed] = [r["output_ids"] for r in e.generate(prompts, params, image_data=[[image], None])]
            assert (e.scheduler.stats.mixed_steps > 0) == mixed
    assert outs[True] == outs[False]
