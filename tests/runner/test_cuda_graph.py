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
from mmserve.runner.cuda_graph import CudaGraphRunner, graph_batch_sizes

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs the kernels in Triton's interpreter
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


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_padded_graph_steps_match_eager_steps(tiny_model_dir, family):
    """Five requests decode in the bucket of 8 (three padding rows), then fewer as they finish at different
    lengths; a window shorter than the sequences (Mistral's 8) included. Padding rows leave the KV pool clean."""
    path = str(tiny_model_dir(family))
    with Engine(model_path=path, dtype="float32", attention_backend="triton", device=DEVICE,
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
    with Engine(model_path=str(tiny_qwen2_vl_dir), dtype="float32", attention_backend="triton", device=DEVICE,
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
