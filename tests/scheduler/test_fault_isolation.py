"""No single request ends the engine: a step that raises fails only the requests it ran (a 500 for each, their KV
freed) and the engine goes on; values no engine can take are refused at admission; a malformed frame on either
socket is dropped. In-process, on a tiny Qwen2."""

from __future__ import annotations

import asyncio
import logging
import threading

import msgspec
import pytest
import zmq
import zmq.asyncio
from engine_helpers import assert_pool_consistent

from mmserve import Engine
from mmserve.config import ServerArgs
from mmserve.engine_process import handle_frame
from mmserve.messages import EngineStats, GenerateRequest, OutputBatch, ToEngine, TokenOutput
from mmserve.tokenizer.manager import TokenizerManager

GREEDY = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}
POISON = 4242  # a token id only the poisoned prompt holds


@pytest.fixture(scope="module")
def engine(model_path):
    with Engine(model_path=model_path, dtype="float32", max_logprobs=5) as e:
        yield e


class FailingForward:
    """Wraps ModelRunner.forward: raises on a batch that satisfies `when` (at most `times` times)."""

    def __init__(self, runner, when, times: int = 1):
        self.runner, self.inner, self.when, self.left = runner, runner.forward, when, times
        self.failed = 0

    def __enter__(self):
        self.runner.forward = self
        return self

    def __exit__(self, *exc):
        del self.runner.forward  # back to the class's method

    def __call__(self, batch):
        if self.left and self.when(batch):
            self.left -= 1
            self.failed += 1
            raise IndexError("index 99999 is out of bounds (simulated)")
        return self.inner(batch)


def test_a_failing_prefill_fails_only_its_request(engine):
    reference = engine.generate("An ordinary prompt about the sea", GREEDY)
    poisoned = lambda batch: POISON in batch.input_ids.tolist()  # noqa: E731
    with FailingForward(engine.runner, poisoned) as fault:
        with pytest.raises(RuntimeError, match="internal error while running this request.*simulated"):
            engine.generate(input_ids=[1, 2, POISON, 3], sampling_params=GREEDY)
        assert fault.failed == 1
        again = engine.generate("An ordinary prompt about the sea", GREEDY)
    assert again["output_ids"] == reference["output_ids"]
    assert_pool_consistent(engine)


def test_a_failing_decode_step_frees_everything_and_the_engine_goes_on(engine):
    reference = engine.generate(["first prompt", "second prompt here"], GREEDY)
    decode = lambda batch: batch.mode.name == "DECODE"  # noqa: E731
    with FailingForward(engine.runner, decode) as fault:
        results = []

        def run(prompt):
            try:
                results.append(engine.generate(prompt, GREEDY))
            except RuntimeError as exc:
                results.append(exc)

        threads = [threading.Thread(target=run, args=(p,)) for p in ("first prompt", "second prompt here")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert fault.failed == 1
        assert any(isinstance(r, RuntimeError) for r in results)
    assert_pool_consistent(engine)
    assert [r["output_ids"] for r in engine.generate(["first prompt", "second prompt here"], GREEDY)] == [
        r["output_ids"] for r in reference]


def test_a_failing_chunk_of_a_long_prompt_releases_its_slots(model_path):
    with Engine(model_path=model_path, dtype="float32", chunked_prefill_size=8) as e:
        second_chunk = lambda batch: batch.seq_lens_cpu[0] > 8  # noqa: E731
        with FailingForward(e.runner, second_chunk):
            with pytest.raises(RuntimeError, match="internal error"):
                e.generate(input_ids=list(range(10, 40)), sampling_params=GREEDY)
        assert e.scheduler.chunked is None
        assert_pool_consistent(e)
        assert len(e.generate(input_ids=list(range(10, 40)), sampling_params=GREEDY)["output_ids"]) == 6


def test_values_past_64_bits_and_too_many_top_logprobs_are_refused(engine):
    huge = 2**64
    for params in ({"seed": huge, "temperature": 1.0}, {"top_k": huge}, {"max_new_tokens": huge},
                   {"stop_token_ids": [huge]}, {"top_logprobs_num": huge}):
        with pytest.raises(ValueError, match="out of range"):
            engine.generate("hi", params)
    with pytest.raises(ValueError, match=r"top_logprobs_num must be <= 5 \(the server's --max-logprobs\)"):
        engine.generate("hi", {"top_logprobs_num": 100000, "max_new_tokens": 1})
    with pytest.raises(ValueError, match="stop_token_ids must be in"):
        engine.generate("hi", {"stop_token_ids": [10**9], "max_new_tokens": 1})
    ok = engine.generate("hi", {"top_logprobs_num": 5, "max_new_tokens": 2})
    assert len(ok["meta_info"]["output_top_logprobs"][0]) == 5
    assert_pool_consistent(engine)


def test_an_unexpected_admission_failure_is_a_500_for_that_request(engine, monkeypatch):
    core = engine.core
    original = core.scheduler.add_request

    def broken(request):
        if request.input_ids[:1] == [POISON]:
            raise KeyError("simulated")
        return original(request)

    monkeypatch.setattr(core.scheduler, "add_request", broken)
    [out] = core.handle(GenerateRequest("bad", [POISON, 1], {"max_new_tokens": 1}))
    assert out.error_status == 500 and "KeyError" in out.finished_reason["message"]
    assert core.handle(GenerateRequest("good", [1, 2], {"max_new_tokens": 1})) == []
    while core.has_work():
        core.step()


def test_the_engine_loop_drops_a_malformed_frame(caplog):
    class Core:
        def __init__(self):
            self.seen = []

        def handle(self, msg):
            self.seen.append(msg)
            return []

    core, decoder = Core(), msgspec.msgpack.Decoder(ToEngine)
    with caplog.at_level(logging.ERROR, logger="mmserve.engine"):
        assert handle_frame(core, decoder, b"\xc1not msgpack") == []
        assert handle_frame(core, decoder, msgspec.msgpack.encode({"type": "Nope"})) == []
    assert "dropped a malformed message" in caplog.text
    frame = msgspec.msgpack.encode(GenerateRequest("r", [1], {}))
    handle_frame(core, decoder, frame)
    assert [m.rid for m in core.seen] == ["r"]


def test_the_api_receive_loop_survives_a_malformed_frame(model_path, tmp_path):
    manager = TokenizerManager(ServerArgs(model_path=model_path, dtype="float32"))

    async def scenario():
        ctx = zmq.asyncio.Context()
        pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
        pull.bind(f"ipc://{tmp_path}/out")
        push.connect(f"ipc://{tmp_path}/out")
        q: asyncio.Queue = asyncio.Queue()
        manager._queues["r"] = q
        receiver = asyncio.create_task(manager._receive(pull, manager.replicas[0]))
        await push.send(b"\x00garbage")
        stats = EngineStats(0, 0, 0, 10, 0, 0, 0)
        done = TokenOutput("r", [7], {"type": "length", "length": 1}, 1, 1, 0)
        await push.send(msgspec.msgpack.encode(OutputBatch([done], stats)))
        out = await asyncio.wait_for(q.get(), 10)
        alive = not receiver.done()
        receiver.cancel()
        push.close(linger=0)
        pull.close(linger=0)
        ctx.term()
        return out, alive

    out, alive = asyncio.run(scenario())
    assert out.new_token_ids == [7] and alive
    assert "r" not in manager._queues
    manager.mm_pool.shutdown(wait=False)
