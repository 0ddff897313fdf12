"""layers/vision.py and the towers built on it: attention over packed sequences against SDPA per sequence, the
vision rotary (eager against transformers', the kernel against eager), the Qwen2-VL, Qwen2.5-VL and Qwen3-VL towers
against transformers' towers on a batch of images and a video, a batch against each item alone, Qwen2.5-VL's
window order against transformers', and the towers planning their shapes on the host only.

Tensors live on DEVICE: on a GPU these tests run the CUDA paths (torch's flash kernel in half precision, the masked
SDPA in float32, the rotary kernel); on the CPU the per-sequence path runs, the masked SDPA is called directly, and
the rotary kernel runs in Triton's interpreter (`run_on_cpu`) on small shapes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mmserve.attention.triton_backend import flash_varlen
from mmserve.layers import fused_ops
from mmserve.layers.vision import (
    PackedSeqs,
    VisionRotary,
    apply_vision_rotary,
    copy_to_device,
    cu_seqlens,
    host_grids,
    masked_attention,
    sequence_attention,
    varlen_attention,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
HALF = [BF16, F16] if DEVICE.type == "cuda" else []  # the flash path; the CPU runs float32 (as the engine does)
LENGTHS = [5, 17, 1, 32, 9]


def packed(lengths: list[int], device: torch.device = DEVICE) -> PackedSeqs:
    (cu,) = copy_to_device([cu_seqlens(lengths)], device)
    return PackedSeqs(cu, list(lengths))


def reference_attention(q, k, v, lengths: list[int]) -> torch.Tensor:
    """SDPA of each sequence alone, in float32 on the CPU: [tokens, heads, head_dim]."""
    outs = [F.scaled_dot_product_attention(*(t.cpu().float().transpose(0, 1) for t in (qs, ks, vs)))
            for qs, ks, vs in zip(q.split(lengths), k.split(lengths), v.split(lengths), strict=True)]
    return torch.cat(outs, dim=1).transpose(0, 1)


def qkv_views(lengths: list[int], heads: int, head_dim: int, dtype: torch.dtype):
    """q, k, v as the layer has them: strided views of one [tokens, 3, heads, head_dim] projection output."""
    g = torch.Generator().manual_seed(sum(lengths) + head_dim)
    qkv = torch.randn(sum(lengths), 3, heads, head_dim, generator=g).to(dtype).to(DEVICE)
    return qkv.unbind(1)


@pytest.mark.parametrize("head_dim", [16, 80])
@pytest.mark.parametrize("dtype", [F32, *HALF], ids=str)
@pytest.mark.parametrize("path", ["varlen", "masked", "sequence"])
def test_packed_attention_equals_sdpa_per_sequence(path, dtype, head_dim):
    q, k, v = qkv_views(LENGTHS, 3, head_dim, dtype)
    seqs = packed(LENGTHS)
    fn = {"varlen": varlen_attention, "masked": masked_attention, "sequence": sequence_attention}[path]
    out = fn(q, k, v, seqs, head_dim**-0.5)
    assert out.shape == q.shape and out.dtype == dtype and out.device == q.device
    tol = 1e-5 if dtype == F32 else 2e-2
    torch.testing.assert_close(out.cpu().float(), reference_attention(q, k, v, LENGTHS), atol=tol, rtol=tol)


def test_flash_attention_runs_where_it_applies():
    """The flash path is taken on CUDA in half precision; elsewhere it declines, and SDPA runs."""
    seqs = packed(LENGTHS)
    for dtype in (F32, *HALF):
        out = flash_varlen(*qkv_views(LENGTHS, 2, 16, dtype), seqs.cu_seqlens, seqs.max_seqlen, 0.25, causal=False)
        assert (out is not None) == (dtype in HALF), dtype


def test_block_mask_is_block_diagonal():
    seqs = packed([2, 3, 1])
    seq_of_row = torch.tensor([0, 0, 1, 1, 1, 2])
    assert torch.equal(seqs.block_mask().cpu(), seq_of_row[:, None] == seq_of_row[None, :])
    assert seqs.block_mask() is seqs.block_mask()  # built once, reused by every layer
    assert seqs.max_seqlen == 3 and seqs.total == 6


def test_copy_to_device_keeps_shapes_and_values():
    parts = [torch.arange(12).view(6, 2), torch.tensor([0, 4, 9], dtype=torch.int32), torch.tensor([7])]
    out = copy_to_device(parts, DEVICE)
    for got, want in zip(out, parts, strict=True):
        assert got.device.type == DEVICE.type and got.dtype == torch.int32 and torch.equal(got.cpu(), want.int())


# ----- rotary -----

def rotary_tables(n: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    positions = torch.stack([torch.arange(n) * 3 % 11, torch.arange(n) * 5 % 7], dim=-1)
    (positions,) = copy_to_device([positions], DEVICE)
    return VisionRotary(head_dim).to(DEVICE)(positions)


def test_eager_rotary_matches_transformers():
    """Bit for bit, q and k rotated in one op; the tables are the first half of the reference's."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    cos, sin = (t.cpu() for t in rotary_tables(9, 16))
    q, k, _ = (t.cpu() for t in qkv_views([9], 2, 16, F32))
    ref_q, ref_k = apply_rotary_pos_emb_vision(q, k, torch.cat((cos, cos), -1), torch.cat((sin, sin), -1))
    ours = apply_vision_rotary(torch.stack([q, k], dim=1), cos, sin)  # CPU tensors: the eager path
    assert torch.equal(ours[:, 0], ref_q) and torch.equal(ours[:, 1], ref_k)


@pytest.mark.parametrize("dtype", [F32, F16, *([BF16] if DEVICE.type == "cuda" else [])], ids=str)
def test_rotary_kernel_matches_eager(dtype, monkeypatch):
    """In place on q and k inside the qkv projection's output, v untouched; float32 math rounded once, as eager (the
    interpreter's float32 -> bfloat16 cast truncates, so bfloat16 is checked on a GPU only)."""
    tokens, heads, head_dim = 7, 3, 16
    cos, sin = rotary_tables(tokens, head_dim)
    qkv = torch.randn(tokens, 3, heads, head_dim, generator=torch.Generator().manual_seed(0)).to(dtype).to(DEVICE)
    expected = apply_vision_rotary(qkv[:, :2].cpu(), cos.cpu(), sin.cpu())  # CPU tensors, kernels off: eager
    v = qkv[:, 2].clone()
    monkeypatch.setattr(fused_ops, "run_on_cpu", True)
    out = apply_vision_rotary(qkv[:, :2], cos, sin)
    assert out.data_ptr() == qkv.data_ptr()  # rotated in place
    assert torch.equal(qkv[:, :2].cpu(), expected) and torch.equal(qkv[:, 2], v)


# ----- towers -----

# items: an image whose LLM grid (5x7) is not a multiple of Qwen2.5's 2x2-unit windows, a two-frame-pair video
# whose grid (2x4) is, and a small image (3x2)
GRIDS = [(1, 10, 14), (2, 4, 8), (1, 6, 4)]

FAMILIES = {
    "qwen2_vl": ("Qwen2VLConfig", "qwen2_vl.modeling_qwen2_vl.Qwen2VisionTransformerPretrainedModel",
                 "mmserve.models.qwen2_vl.Qwen2VLForConditionalGeneration",
                 dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2, hidden_size=64, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2), [2, 3, 3]),
    "qwen2_5_vl": ("Qwen2_5_VLConfig", "qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel",
                   "mmserve.models.qwen2_5_vl.Qwen2_5_VLForConditionalGeneration",
                   dict(depth=4, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64,
                        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                        fullatt_block_indexes=[1, 3]), [2, 3, 3]),
    "qwen3_vl": ("Qwen3VLConfig", "qwen3_vl.modeling_qwen3_vl.Qwen3VLVisionModel",
                 "mmserve.models.qwen3_vl.Qwen3VLForConditionalGeneration",
                 dict(depth=3, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64, patch_size=16,
                      spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                      deepstack_visual_indexes=[0, 2]), [4, 2, 2]),
}


def _import(path: str):
    import importlib

    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


@pytest.fixture(scope="module", params=list(FAMILIES))
def towers(request):
    """(transformers' tower, ours with its weights, the vision config) for a family, float32 on the CPU."""
    import transformers

    config_name, hf_path, ours_path, vision, section = FAMILIES[request.param]
    text = dict(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section})
    config = getattr(transformers, config_name)(text_config=text, vision_config=vision)
    torch.manual_seed(7)
    hf = _import("transformers.models." + hf_path)._from_config(config.vision_config, dtype=F32).eval()
    with torch.no_grad():  # larger than the default init, so that every layer matters
        for name, p in hf.named_parameters():
            if "norm" in name or "ln_q" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.2)
    model = _import(ours_path)(config).eval()
    loaded = model.load_weights(("model.visual." + n, t) for n, t in hf.state_dict().items())
    assert loaded == {n for n, _ in model.visual.named_parameters(prefix="visual")}
    return hf, model.visual, config.vision_config


def pixels_for(grids, vc, seed: int = 0) -> torch.Tensor:
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    rows = sum(t * h * w for t, h, w in grids)
    return torch.randn(rows, patch_dim, generator=torch.Generator().manual_seed(seed))


def hf_features(tower, pixels: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """transformers' merged features, DeepStack levels concatenated after them as our tower returns them (the output
    types differ between transformers versions)."""
    out = tower(pixels, grid_thw=grid_thw)
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple):
        main, levels = out
    else:
        main, levels = out.pooler_output, getattr(out, "deepstack_features", None)
    return torch.cat([main, *(levels or [])], dim=-1)


@pytest.mark.parametrize("dtype", [F32, *HALF], ids=str)
def test_tower_matches_transformers(towers, dtype):
    """Two images and a video in one call, on DEVICE (with flash attention in half precision on a GPU)."""
    hf, ours, vc = towers
    pixels, grid = pixels_for(GRIDS, vc), torch.tensor(GRIDS)
    with torch.no_grad():
        expected = hf_features(hf, pixels, grid)
        got = copy.deepcopy(ours).to(DEVICE, dtype)(pixels.to(DEVICE), grid)
    assert got.shape == expected.shape
    if dtype == F32:
        torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=1e-4)
    else:  # half precision against float32 (bfloat16 lands within 1% of the features' scale on the CPU)
        assert (got.cpu().float() - expected).abs().max() <= 0.03 * expected.abs().max()


@pytest.mark.parametrize("dtype", [F32, *HALF], ids=str)
def test_batch_equals_each_item_alone(towers, dtype):
    """Packing items together changes nothing: no attention reaches across items, frames or windows."""
    _, ours, vc = towers
    pixels = pixels_for(GRIDS, vc, seed=1).to(DEVICE)
    tower = copy.deepcopy(ours).to(DEVICE, dtype)
    with torch.no_grad():
        together = tower(pixels, torch.tensor(GRIDS))
        alone = [tower(p, torch.tensor([g])) for p, g in
                 zip(pixels.split([t * h * w for t, h, w in GRIDS]), GRIDS, strict=True)]
    alone = torch.cat(alone)
    if dtype == F32:
        torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    else:  # matmuls of other sizes round differently; attention across items would be far off
        assert (together.float() - alone.float()).abs().max() <= 0.02 * alone.float().abs().max()


def test_tower_reads_nothing_back_from_the_device(towers):
    """Every shape comes from the host grid: with the weights and pixels on the meta device, which holds no values,
    any read of a device tensor (.tolist(), .item(), a data-dependent shape) would fail."""
    _, ours, vc = towers
    pixels = pixels_for(GRIDS, vc)
    merged_tokens = sum(t * h * w for t, h, w in GRIDS) // vc.spatial_merge_size**2
    meta = copy.deepcopy(ours).to("meta")
    with torch.no_grad():
        out = meta(pixels.to("meta"), torch.tensor(GRIDS))
    assert out.device.type == "meta" and out.shape[0] == merged_tokens
    q = torch.empty(merged_tokens, 2, 16, device="meta")
    assert masked_attention(q, q, q, packed([merged_tokens - 3, 3], torch.device("meta")), 0.25).is_meta
    with pytest.raises(AssertionError, match="on the host"):
        host_grids(torch.tensor(GRIDS, device="meta"))


# ----- Qwen2.5-VL's windows -----

def hf_window_index(grid_thw: torch.Tensor, vc) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' window permutation and window offsets: a function of transformers.vision_utils in recent
    versions, a method of the vision tower before."""
    try:
        from transformers.vision_utils import get_vision_window_index
    except ImportError:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

        index, cu = Qwen2_5_VisionTransformerPretrainedModel._from_config(vc).get_window_index(grid_thw)
        return index, torch.unique_consecutive(torch.tensor(cu, dtype=torch.int32))
    return get_vision_window_index(grid_thw, vc.spatial_merge_size, vc.window_size, vc.patch_size)


@pytest.mark.parametrize("window_size", [56, 112])
def test_window_order_matches_transformers(window_size):
    """Images and videos together: grids smaller than, equal to, multiples of and not multiples of the window."""
    from transformers import Qwen2_5_VLConfig

    from mmserve.models.qwen2_5_vl import window_order

    vc = Qwen2_5_VLConfig(vision_config=dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=48,
                                             out_hidden_size=64, window_size=window_size)).vision_config
    grids = [(1, 10, 14), (3, 8, 8), (1, 2, 2), (2, 16, 6), (1, 4, 20), (4, 6, 10)]
    window = window_size // vc.spatial_merge_size // vc.patch_size
    units, lengths = window_order(grids, vc.spatial_merge_size, window)
    index, cu = hf_window_index(torch.tensor(grids), vc)
    assert torch.equal(units, index)
    assert torch.equal(cu_seqlens(lengths), cu.int())
