"""Vision towers from CUDA graphs (`VisionGraphRunner`): a call padded to its patch bucket, its plan in the static
buffers, gives the eager tower's features, and the engine's tokens do not change.

On a GPU the graphs are captured and replayed; on the CPU the runner runs in its eager mode (`use_graphs=False`: the
same static buffers, buckets, padding sequences and bounds, the tower not captured), so CI checks everything but the
capture."""

from __future__ import annotations

import pytest
import torch
from vl_helpers import IMAGE, picture

from mmserve import Engine
from mmserve.layers.vision import VisionGraphRunner, vision_patch_buckets

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GRAPHS = DEVICE.type == "cuda"
BUCKETS = [64, 128, 256]
# calls of one and several items: an image not a multiple of Qwen2.5's 2x2-unit windows (5x7 units), a small one,
# one exactly a bucket (64 patches: no padding), a two-frame-pair video, and all together
CALLS = [[(1, 10, 14)], [(1, 6, 4)], [(1, 8, 8)], [(1, 6, 4), (1, 4, 4)], [(2, 4, 8)],
         [(1, 10, 14), (1, 6, 4), (2, 4, 8)]]


def test_vision_patch_buckets():
    assert vision_patch_buckets(4096) == [256, 512, 1024, 1536, 2048, 3072, 4096]
    assert vision_patch_buckets(1000) == [256, 512, 1024]
    assert vision_patch_buckets(100) == [128]
    assert vision_patch_buckets(6000)[-3:] == [4096, 5120, 6016]
    with pytest.raises(ValueError, match="vision_cuda_graph_max_patches"):
        vision_patch_buckets(0)


def tower(family: str, dtype: torch.dtype) -> torch.nn.Module:
    """A small random tower: Qwen2-VL's, or Qwen2.5-VL's with windows of 2x2 merged units and two full blocks."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    if family == "qwen2_vl":
        from mmserve.models.qwen2_vl import Qwen2VisionTransformer as cls

        vc = Qwen2VLConfig(vision_config=dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2, hidden_size=64,
                                              patch_size=14, spatial_merge_size=2, temporal_patch_size=2)).vision_config
    else:
        from mmserve.models.qwen2_5_vl import Qwen2_5_VisionTransformer as cls

        vc = Qwen2_5_VLConfig(vision_config=dict(depth=4, hidden_size=32, num_heads=2, intermediate_size=48,
                                                 out_hidden_size=64, patch_size=14, spatial_merge_size=2,
                                                 temporal_patch_size=2, window_size=56,
                                                 fullatt_block_indexes=[1, 3])).vision_config
    torch.manual_seed(3)
    model = cls(vc).eval()
    with torch.no_grad():  # larger than the default init, so that every layer matters
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name or "ln_q" in name else 0.2 * torch.randn_like(p))
    return model.to(DEVICE, dtype)


def pixels(grids, patch_dim: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(t * h * w, patch_dim, generator=g) for t, h, w in grids]


@pytest.mark.parametrize("dtype", [torch.float32, *([torch.bfloat16] if GRAPHS else [])], ids=str)
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_padded_tower_matches_eager(family, dtype):
    """Every call in its bucket (64, 128 or 256 patches; padding patches as sequences of their own, up to a window
    long for Qwen2.5-VL's window blocks) gives the eager tower's features, whichever call ran before in the bucket."""
    model = tower(family, dtype)
    graphs = VisionGraphRunner(model, BUCKETS, use_graphs=GRAPHS)
    graphs.capture()
    assert sorted(graphs.graphs) == (BUCKETS if GRAPHS else [])
    patch_dim = model.patch_embed.proj.weight.shape[1]
    with torch.inference_mode():
        for seed, grids in enumerate(CALLS + CALLS[::-1]):
            items = pixels(grids, patch_dim, seed)
            want = model(torch.cat(items).to(DEVICE), torch.tensor(grids))
            got = graphs.run(items, grids)
            assert got is not None and got.shape == want.shape
            if dtype == torch.float32:  # (on a GPU, matmuls of other row counts may pick other kernels)
                tol = 1e-4 if GRAPHS else 1e-5
                torch.testing.assert_close(got, want, atol=tol, rtol=tol)
            else:  # matmuls of other sizes round differently; padding leaking into real rows would be far off
                assert (got.float() - want.float()).abs().max() <= 0.02 * want.float().abs().max()
            assert got.data_ptr() != graphs.pixel_values.data_ptr() and all(
                got.data_ptr() != out.data_ptr() for out in graphs.outputs.values())  # a copy, kept by the cache


def test_calls_that_do_not_fit_run_eagerly():
    """More patches than the largest bucket, or more frames than a bucket holds sequences: None (encode then runs the
    tower eagerly)."""
    model = tower("qwen2_5_vl", torch.float32)
    graphs = VisionGraphRunner(model, BUCKETS, use_graphs=False)
    graphs.capture()
    patch_dim = model.patch_embed.proj.weight.shape[1]
    assert graphs.capacity[64]["frames"] == 16 and graphs.capacity[64]["windows"] == 32
    with torch.inference_mode():
        assert graphs.run(pixels([(1, 16, 18)], patch_dim, 0), [(1, 16, 18)]) is None  # 288 patches
        assert graphs.run(pixels([(20, 2, 2)], patch_dim, 0), [(20, 2, 2)]) is None  # 20 frames
        assert graphs.run(pixels([(15, 2, 2)], patch_dim, 0), [(15, 2, 2)]) is not None  # 15 and the padding


def test_qwen3_vl_tower_stays_eager():
    """Qwen3-VL inherits the hook but its tower has no plan: no graphs, and encode runs it eagerly."""
    from transformers import Qwen3VLConfig

    from mmserve.models.qwen3_vl import Qwen3VLForConditionalGeneration

    text = dict(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                                    "mrope_section": [4, 2, 2]})
    vision = dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64, deepstack_visual_indexes=[0])
    model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(text_config=text, vision_config=vision))
    assert model.capture_vision_graphs(None, None, 256, use_graphs=False) is None and model.vision_graphs is None


def test_engine_tokens_unchanged_with_vision_graphs(tiny_qwen2_5_vl_dir):
    """Qwen2.5-VL's greedy tokens with the tower from its graphs (one bucket of 256 patches) equal the eager
    tower's, for images of several sizes; a step past the graphs runs eagerly."""
    prompts = [f"Describe {IMAGE} briefly.", f"What is in {IMAGE}?"]
    greedy = {"temperature": 0, "max_new_tokens": 5, "ignore_eos": True}
    kwargs = {"model_path": str(tiny_qwen2_5_vl_dir), "dtype": "float32", "device": DEVICE.type}

    def tokens(engine: Engine) -> list[list[int]]:
        alone = engine.generate(prompts[:1], greedy, image_data=[[picture(90, 60, 3)]])  # 24 patches
        together = engine.generate(prompts, greedy, image_data=[[picture(70, 90, 5)], [picture(60, 120, 4)]])
        large = engine.generate(prompts[:1], greedy, image_data=[[picture(300, 240, 6)]])  # over 256 patches
        return [r["output_ids"] for r in alone + together + large]

    with Engine(vision_cuda_graph_max_patches=0, **kwargs) as engine:
        assert engine.runner.model.vision_graphs is None
        eager = tokens(engine)
    with Engine(vision_cuda_graph_max_patches=256, **kwargs) as engine:
        model = engine.runner.model
        if not GRAPHS:
            model.capture_vision_graphs(None, None, 256, use_graphs=False)
        graphs = model.vision_graphs
        assert graphs is not None and graphs.buckets == [256]
        calls = []
        original = graphs.run
        graphs.run = lambda items, grids: calls.append((sum(p.shape[0] for p in items),
                                                        original(items, grids))) or calls[-1][1]
        assert tokens(engine) == eager
        # every step's images from the graph, but the large one's, eagerly
        assert [out is None for n, out in calls] == [n > 256 for n, _ in calls] and len(calls) >= 3
        assert any(out is None for _, out in calls) and calls[0][1] is not None
