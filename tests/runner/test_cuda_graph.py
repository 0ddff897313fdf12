"""Decode from CUDA graphs: padded batches over static buffers give the tokens of plain eager steps.

On a GPU the engine captures real graphs (on by default) and is compared with `--disable-cuda-graph`. On the CPU
the graph runner runs in its eager mode (`use_graphs=False`: the same static buffers, buckets and padding rows,
the forward not captured) with the Triton kernels in the interpreter, so CI checks everything but the capture.
"""

from __future__ import annotations

import pytest
import torch
from engine_helpers import assert_pool_consistent
from vl_helpers import IMAGE, picture

from mmserve import Engine
from mmserve.config import ServerArgs
from mmserve.engine_core import EngineCore
from mmserve.messages import GenerateRequest
from mmserve.runner.cuda_graph import CudaGraphRunner, PrefillGraphRunner, graph_batch_sizes, prefill_token_buckets

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs the kernels in Triton's interpreter
# The eager engine each graph run is compared with: on the CPU the torch backend, which the Triton kernels are
# tested equal to elsewhere (tests/attention), at a fraction of the interpreter's time
EAGER_BACKEND = "triton" if DEVICE == "cuda" else "torch"
# On the CPU only the family with a sliding window (the harder case) runs each graph test: the interpreter is slow
GRAPH_FAMILIES = {"decode": ["qwen2", "mistral"], "prefill": ["llama", "mistral"]} if DEVICE == "cuda" else {
    "decode": ["mistral"], "prefill": ["mistral"]}
GREEDY = {"temperature": 0, "max_new_tokens": 5, "ignore_eos": True}
PROMPTS = ["The quick brown fox", "Hello", "A much longer prompt about the weather in the mountains today",
           "One two three four five", "Paris is"]


def test_graph_batch_sizes():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(5) == [1, 2, 3, 4, 5]
    sizes = graph_batch_sizes(256)
    assert sizes[:6] == [1, 2, 3, 4, 8, 16] and sizes[-1] == 256 and sizes == sorted(set(sizes))
    assert graph_batch_sizes(300)[-2:] == [288, 300]
    with pytest.raises(ValueError, match="cuda_graph_max_bs"):
        graph_batch_sizes(0)


def _tokens(engine: Engine, prompts: list[str], image=None) -> list[list[int]]:
    if image is None:
        return [r["output_ids"] for r in engine.generate(prompts, GREEDY)]
    return [r["output_ids"] for r in engine.generate(prompts, GREEDY, image_data=[[image]] * len(prompts))]


def _with_graph_runner(engine: Engine, max_bs: int) -> CudaGraphRunner:
    """Attach a graph runner in eager mode to an engine built without one (the CPU path)."""
    runner = engine.runner
    graphs = CudaGraphRunner(runner, max_bs, use_graphs=False)
    graphs.capture()
    runner.graph_runner = graphs
    return graphs


@pytest.mark.parametrize("family", GRAPH_FAMILIES["decode"])
def test_padded_graph_steps_match_eager_steps(tiny_model_dir, family):
    """Five requests decode in the bucket of 8 (three padding rows), then fewer as they finish at different
    lengths; a window shorter than the sequences (Mistral's 8) included. Padding rows leave the KV pool clean."""
    path = str(tiny_model_dir(family))
    with Engine(model_path=path, dtype="float32", attention_backend=EAGER_BACKEND, device=DEVICE,
                disable_cuda_graph=True) as engine:
        eager = _tokens(engine, PROMPTS)
    kwargs = {} if DEVICE == "cuda" else {"disable_cuda_graph": True}
    with Engine(model_path=path, dtype="float32", attention_backend="triton", device=DEVICE, cuda_graph_max_bs=8,
                **kwargs) as engine:
        graphs = engine.runner.graph_runner if DEVICE == "cuda" else _with_graph_runner(engine, 8)
        assert graphs is not None and graphs.batch_sizes == [1, 2, 3, 4, 8]
        replays = []
        original = graphs.replay
        graphs.replay = lambda batch: (replays.append(batch.batch_size), original(batch))[1]
        assert _tokens(engine, PROMPTS) == eager
        assert replays and set(replays) >= {5}  # the padded bucket ran
        assert _tokens(engine, PROMPTS[:1]) == eager[:1]  # batch 1, whose graph a larger one's memory shares
        assert_pool_consistent(engine)


def test_mrope_model_decodes_from_graphs(tiny_qwen2_vl_dir):
    """Qwen2-VL's decode positions are [3, B] (text index plus each request's media offset) in the static buffer."""
    image = picture(90, 60, 3)
    prompts = [f"Describe {IMAGE} briefly.", f"What is in {IMAGE}?", f"{IMAGE} Say something."]
    with Engine(model_path=str(tiny_qwen2_vl_dir), dtype="float32", attention_backend=EAGER_BACKEND, device=DEVICE,
                disable_cuda_graph=True) as engine:
        eager = _tokens(engine, prompts, image)
    kwargs = {} if DEVICE == "cuda" else {"disable_cuda_graph": True}
    with Engine(model_path=str(tiny_qwen2_vl_dir), dtype="float32", attention_backend="triton", device=DEVICE,
                cuda_graph_max_bs=4, **kwargs) as engine:
        graphs = engine.runner.graph_runner if DEVICE == "cuda" else _with_graph_runner(engine, 4)
        assert graphs.positions.shape == (3, 4)
        assert _tokens(engine, prompts, image) == eager


def test_graphs_follow_the_flags(tiny_model_dir):
    """Off with --disable-cuda-graph, and never built on the CPU or with the torch backend (which cannot be
    captured); the bucket list stops at --cuda-graph-max-bs and never passes --max-running-requests."""
    path = str(tiny_model_dir("qwen2"))
    with Engine(model_path=path, dtype="float32", device=DEVICE, attention_backend="torch") as engine:
        assert engine.runner.graph_runner is None
    if DEVICE == "cuda":
        with Engine(model_path=path, dtype="float32", max_running_requests=6, cuda_graph_max_bs=64) as engine:
            assert engine.runner.graph_runner.batch_sizes == [1, 2, 3, 4, 6]
            assert engine.runner.graph_runner.graphs.keys() == {1, 2, 3, 4, 6}


# ----- prefill graphs -----


def test_prefill_token_buckets():
    assert prefill_token_buckets(16) == [16]
    assert prefill_token_buckets(100) == [16, 32, 64, 100]
    buckets = prefill_token_buckets(1024)
    assert buckets[:5] == [16, 32, 64, 128, 192] and buckets[-3:] == [768, 896, 1024]
    assert buckets == sorted(set(buckets))
    with pytest.raises(ValueError, match="cuda_graph_max_prefill_tokens"):
        prefill_token_buckets(0)


def _with_prefill_graphs(engine: Engine | EngineCore, max_tokens: int) -> PrefillGraphRunner:
    runner = engine.runner
    graphs = PrefillGraphRunner(runner, max_tokens, use_graphs=False)
    graphs.capture()
    runner.prefill_graph_runner = graphs
    return graphs


def _count_replays(graphs) -> list[tuple[int, int, bool]]:
    """(tokens, requests, any cached prefix) of every step the runner replays."""
    seen = []
    original = graphs.replay
    graphs.replay = lambda batch: (seen.append((batch.input_ids.shape[0], batch.batch_size,
                                                any(batch.prefix_lens_cpu))), original(batch))[1]
    return seen


@pytest.mark.parametrize("family", GRAPH_FAMILIES["prefill"])
def test_padded_prefill_graphs_match_eager_prefill(tiny_model_dir, family):
    """Prompts alone and together, fresh and behind a cached prefix, a window shorter than the prompts (Mistral's
    8), prefilled through the padded static buffers (buckets of 16/32/48 tokens, 16 request rows, one padding
    request), give the eager engine's tokens; the padding writes nothing but the dummy slot."""
    path = str(tiny_model_dir(family))
    long = PROMPTS[2] + " and the rivers below them"
    with Engine(model_path=path, dtype="float32", attention_backend=EAGER_BACKEND, device=DEVICE,
                disable_cuda_graph=True) as engine:
        eager = [_tokens(engine, [p]) for p in PROMPTS] + [_tokens(engine, PROMPTS), _tokens(engine, [long])]
    kwargs = {} if DEVICE == "cuda" else {"disable_cuda_graph": True}
    with Engine(model_path=path, dtype="float32", attention_backend="triton", device=DEVICE,
                cuda_graph_max_prefill_tokens=48, **kwargs) as engine:
        graphs = engine.runner.prefill_graph_runner if DEVICE == "cuda" else _with_prefill_graphs(engine, 48)
        assert graphs.token_buckets == [16, 32, 48]
        replays = _count_replays(graphs)
        got = [_tokens(engine, [p]) for p in PROMPTS] + [_tokens(engine, PROMPTS), _tokens(engine, [long])]
        assert got == eager
        assert any(n == 1 and not cached for _, n, cached in replays)  # a prompt alone
        assert any(n > 1 for _, n, _ in replays)  # several prompts in one step
        assert any(cached for _, _, cached in replays)  # behind the cache (PROMPTS again, then `long`)
        assert engine.runner.kv_pool.k_buffers[0][0].abs().sum() > 0  # the padding did write the dummy slot
        assert_pool_consistent(engine)


def _input_logprobs(path: str, graph_tokens: int) -> tuple[list[float | None], list[int]]:
    """Prompt log-probs of a 40-token prompt from position 0 (41 logits rows in its step), through EngineCore."""
    kwargs = {"disable_cuda_graph": True} if graph_tokens == 0 or DEVICE != "cuda" else {}
    backend = "triton" if graph_tokens else EAGER_BACKEND
    core = EngineCore(ServerArgs(model_path=path, dtype="float32", attention_backend=backend, device=DEVICE,
                                 cuda_graph_max_prefill_tokens=graph_tokens, **kwargs))
    if graph_tokens and DEVICE != "cuda":
        _with_prefill_graphs(core, graph_tokens)
    core.handle(GenerateRequest("scored", list(range(100, 140)), {**GREEDY, "max_new_tokens": 2},
                                logprob_start_len=0))
    logprobs, tokens = [], []
    while core.has_work():
        for out in core.step():
            tokens.extend(out.new_token_ids)
            logprobs.extend(out.input_token_logprobs or [])
    return logprobs, tokens


def test_prefill_graphs_leave_what_they_cannot_run_to_the_eager_path(tiny_model_dir):
    """More than 16 requests, prompt log-probs over more than 16 rows: eager, with the same results; a prompt
    longer than the largest bucket runs its chunks (no logits rows but the last chunk's) through the graphs."""
    path = str(tiny_model_dir("qwen2"))
    many = [f"Request number {i} asks" for i in range(17)]
    long = " ".join(["word"] * 60)
    with Engine(model_path=path, dtype="float32", attention_backend=EAGER_BACKEND, device=DEVICE,
                disable_cuda_graph=True, chunked_prefill_size=16) as engine:
        eager = (_tokens(engine, many), _tokens(engine, [long]))
    kwargs = {} if DEVICE == "cuda" else {"disable_cuda_graph": True}
    with Engine(model_path=path, dtype="float32", attention_backend="triton", device=DEVICE,
                cuda_graph_max_prefill_tokens=32, chunked_prefill_size=16, **kwargs) as engine:
        graphs = engine.runner.prefill_graph_runner if DEVICE == "cuda" else _with_prefill_graphs(engine, 32)
        replays = _count_replays(graphs)
        assert _tokens(engine, many) == eager[0]
        assert all(n <= 16 for _, n, _ in replays)
        replays.clear()
        assert _tokens(engine, [long]) == eager[1]
        assert len(replays) >= 3 and all(t <= 16 for t, _, _ in replays)  # chunks of 16 through the graphs
        assert_pool_consistent(engine)
    want, want_tokens = _input_logprobs(path, 0)
    got, got_tokens = _input_logprobs(path, 32)
    assert got_tokens == want_tokens and len(got) == len(want) == 40 and got[0] is None
    assert got[1:] == pytest.approx(want[1:], abs=1e-4)


@pytest.mark.parametrize("fixture", ["tiny_qwen2_5_vl_dir", "tiny_qwen3_vl_dir"])
def test_image_prefills_replay_the_language_model_from_embeddings(fixture, request):
    """Qwen2.5-VL (`embed`): steps with images encode them eagerly into the static embeddings buffer and replay
    the language model, alone, batched, and in chunks of 16 that cut an image; the same tokens as eager steps.
    Qwen3-VL (DeepStack, no `embed`): its image steps stay eager, its text steps replay."""
    path = str(request.getfixturevalue(fixture))
    prompts = [f"Describe {IMAGE} briefly.", f"What is in {IMAGE}?"]
    image = picture(90, 60, 3)
    kwargs = {"dtype": "float32", "device": DEVICE, "chunked_prefill_size": 16}
    with Engine(model_path=path, disable_cuda_graph=True, attention_backend=EAGER_BACKEND, **kwargs) as engine:
        eager = (_tokens(engine, prompts, image), _tokens(engine, prompts[:1], image), _tokens(engine, ["Hello"]))
    with Engine(model_path=path, cuda_graph_max_prefill_tokens=32, attention_backend="triton", **kwargs,
                **({} if DEVICE == "cuda" else {"disable_cuda_graph": True})) as engine:
        graphs = engine.runner.prefill_graph_runner if DEVICE == "cuda" else _with_prefill_graphs(engine, 32)
        from_embeds = fixture == "tiny_qwen2_5_vl_dir"
        assert graphs.from_embeds == from_embeds
        replays = []
        original = graphs.replay
        graphs.replay = lambda batch: (replays.append(bool(batch.mm_inputs and any(batch.mm_inputs))),
                                       original(batch))[1]
        got = (_tokens(engine, prompts, image), _tokens(engine, prompts[:1], image), _tokens(engine, ["Hello"]))
        assert got == eager
        assert (True in replays) == from_embeds and False in replays
        assert_pool_consistent(engine)


def test_bidirectional_image_steps_replay_with_their_spans(tiny_gemma3_dir):
    """Gemma 3's images attend both ways: its image steps replay the graphs captured with the last-keys table
    (alone, batched, and in chunks of 16 that bend around the 16-token images), with the eager engine's tokens;
    text steps replay the plain graphs."""
    image = "<start_of_image>"
    prompts = [f"<start_of_turn>user\n{image}Describe it.<end_of_turn>\n<start_of_turn>model\n",
               f"What is in{image}?"]
    pictures = [picture(90, 60, 3)]
    kwargs = {"dtype": "float32", "device": DEVICE, "chunked_prefill_size": 16}
    with Engine(model_path=str(tiny_gemma3_dir), disable_cuda_graph=True, attention_backend=EAGER_BACKEND,
                **kwargs) as engine:
        eager = engine.generate(prompts, GREEDY, image_data=[pictures] * 2, return_logits=True)
    with Engine(model_path=str(tiny_gemma3_dir), cuda_graph_max_prefill_tokens=32, attention_backend="triton",
                **kwargs, **({} if DEVICE == "cuda" else {"disable_cuda_graph": True})) as engine:
        graphs = engine.runner.prefill_graph_runner if DEVICE == "cuda" else _with_prefill_graphs(engine, 32)
        assert graphs.spans and (32, False, True) in graphs.batches
        replays = []
        original = graphs.replay
        graphs.replay = lambda batch: (replays.append(batch.span_last_keys() is not None), original(batch))[1]
        got = engine.generate(prompts, GREEDY, image_data=[pictures] * 2, return_logits=True)
        for ours, ref in zip(got, eager, strict=True):  # logits too: a causal-only image moves them by > 1e-2
            assert ours["output_ids"] == ref["output_ids"]
            for a, b in zip(ours["meta_info"]["logits"], ref["meta_info"]["logits"], strict=True):
                assert (a - b).abs().max() < 1e-4
        assert True in replays and False in replays  # image chunks replayed with their spans, text ones without
        assert_pool_consistent(engine)
