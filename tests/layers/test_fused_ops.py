"""The fused Triton kernels (`layers/fused_kernels.py`, reached through `layers/fused_ops.py`) against the layers'
eager code: RMSNorm with and without the residual, on strided per-head views and in chunks; the gated activations;
rotary in place on the qkv split's views, partial and M-RoPE (sections and interleaved); the layers' dispatch; and a
whole model generating the same tokens either way.

float32 agrees to float32 rounding; bfloat16 bit for bit (the kernels repeat eager's roundings) but for a rare last
place from exp, rsqrt and the order of the RMS sum. Without a GPU the kernels run in Triton's interpreter on CPU
tensors (slow per program: shapes stay small), with `run_on_cpu` set to send CPU tensors to them.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

from mmserve.layers import fused_ops
from mmserve.layers.activation import GatedActivation
from mmserve.layers.norm import RMSNorm
from mmserve.layers.rotary import MRotaryEmbedding, RotaryEmbedding

# Without a GPU the kernels run in Triton's interpreter: tests/conftest.py sets TRITON_INTERPRET before anything
# imports triton (transformers does), which its library functions (tl.sum, ...) need as much as our kernels.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# exp(-x) overflows to inf for very negative x, in the interpreter's numpy too; act(x) is then -0, as in eager
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

F32, BF16 = torch.float32, torch.bfloat16
# A last-place difference in rsqrt (the GPU's is approximate) or in the order of the sum of squares can flip the
# rounding of the normalised value, and the weight multiply can then round that unit into two.
NORM_ULPS = 2
ROPE = {"rope_type": "default", "rope_theta": 10000.0}
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}


@pytest.fixture
def kernels(monkeypatch):
    """Layers on DEVICE tensors take the kernel path (CUDA does anyway; the CPU is sent there)."""
    monkeypatch.setattr(fused_ops, "run_on_cpu", True)


def eager(fn, *args):
    """The eager reference: `fn` (a CPU copy if a module) on CPU copies of the tensors in `args`, kernels off."""
    if isinstance(fn, nn.Module):
        fn = copy.deepcopy(fn).cpu()
    saved, fused_ops.run_on_cpu = fused_ops.run_on_cpu, False
    try:
        return fn(*(a.cpu() if isinstance(a, torch.Tensor) else a for a in args))
    finally:
        fused_ops.run_on_cpu = saved


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in bfloat16 units in the last place (+0 and -0 coincide)."""
    def ordered(t):
        bits = t.cpu().view(torch.int16).int()
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)
    assert a.dtype == b.dtype == BF16
    return (ordered(a) - ordered(b)).abs()


def assert_close(out: torch.Tensor, ref: torch.Tensor, bf16_exact: float = 0.99, max_ulps: int = 1) -> None:
    """float32: within 1e-5 (relative where larger than 1). bfloat16: at most `max_ulps` units in the last place,
    and all but a few elements exact."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if ref.dtype == F32:
        torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-5)
    else:
        d = ulps(out, ref)
        assert d.max().item() <= max_ulps and (d == 0).float().mean().item() >= bf16_exact, d.max().item()


def random_norm(hidden: int, dtype: torch.dtype, seed: int = 0) -> RMSNorm:
    norm = RMSNorm(hidden, eps=1e-5, dtype=dtype)
    norm.weight.data = (1.0 + 0.3 * torch.randn(hidden, generator=torch.Generator().manual_seed(seed))).to(dtype)
    return norm


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("hidden", [64, 77])
@pytest.mark.parametrize("tokens", [1, 5])
def test_rms_norm_matches_eager(kernels, dtype, hidden, tokens):
    g = torch.Generator().manual_seed(hidden + tokens)
    x = (3 * torch.randn(tokens, hidden, generator=g)).to(dtype)
    residual = torch.randn(tokens, hidden, generator=g).to(dtype)
    norm = random_norm(hidden, dtype)
    ref_plain, (ref_out, ref_sum) = eager(norm, x), eager(norm, x, residual)
    norm = norm.to(DEVICE)
    x, residual = x.to(DEVICE), residual.to(DEVICE)
    assert_close(norm(x), ref_plain, max_ulps=NORM_ULPS)
    out, summed = norm(x, residual)
    assert_close(out, ref_out, max_ulps=NORM_ULPS)
    assert torch.equal(summed.cpu(), ref_sum)  # one add, rounded once either way
    # the chunked path of long rows, reached with a small block (hidden 77 = 4 chunks of 16 and a partial one)
    out, summed = fused_ops.rms_norm(x, norm.weight, norm.eps, residual, max_block=16)
    assert_close(out, ref_out, max_ulps=NORM_ULPS)
    assert torch.equal(summed.cpu(), ref_sum)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_rms_norm_per_head_on_strided_views(kernels, dtype):
    """Qwen3's q/k norms: [T, heads, head_dim] views into the qkv output (rows neither contiguous nor evenly
    strided), which the kernel reads in place and leaves untouched; also a 4-D view whose leading dims do not
    collapse into a view, and a float32 weight on bfloat16 input (eager promotes the product to float32)."""
    tokens, heads, kv_heads, head_dim = 3, 4, 2, 24
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype).to(DEVICE)
    before = qkv.clone()
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = q.reshape(tokens, heads, head_dim), k.reshape(tokens, kv_heads, head_dim)
    assert not q.is_contiguous() and q.data_ptr() == qkv.data_ptr()
    norm = random_norm(head_dim, dtype)
    refs = [eager(norm, t) for t in (q, k)]
    norm = norm.to(DEVICE)
    for t, ref in zip((q, k), refs, strict=True):
        assert_close(norm(t), ref, max_ulps=NORM_ULPS)
    assert torch.equal(qkv, before)

    x4 = torch.randn(2, 6, 3, 40, generator=g).to(dtype).to(DEVICE)[:, :3]  # [2, 3, 3, 40]: dims 0, 1 don't merge
    assert x4.flatten(0, 1).data_ptr() != x4.data_ptr()
    norm = random_norm(40, dtype, seed=2)
    ref = eager(norm, x4)
    assert_close(norm.to(DEVICE)(x4), ref, max_ulps=NORM_ULPS)

    wide = random_norm(40, F32, seed=3)  # float32 weight
    ref = eager(wide, x4)
    assert ref.dtype == F32
    assert_close(wide.to(DEVICE)(x4), ref, max_ulps=NORM_ULPS)


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize(("tokens", "inter"), [(1, 45), (4, 45), (2, 1100)])  # 1100: several column blocks
def test_gated_activation_matches_eager(kernels, dtype, act, tokens, inter):
    g = torch.Generator().manual_seed(tokens * inter)
    # gate | up as a slice of a wider tensor: rows strided, as from a projection with extra columns
    wide = (3 * torch.randn(tokens, 2 * inter + 7, generator=g)).to(dtype).to(DEVICE)
    x = wide[:, 3 : 3 + 2 * inter]
    layer = GatedActivation(act)
    assert layer.fused_act is not None
    ref = eager(layer, x)
    out = layer(x)
    assert out.is_contiguous()
    if act == "silu":
        assert_close(out, ref, bf16_exact=0.999)
        return
    # gelu: eager's 0.5 * x * (1 + tanh(z)) cancels for x below about -3 and keeps few correct digits there (the
    # kernel's x * sigmoid(2z) does not); the results are tiny there, and the same to a unit elsewhere
    gate = x[:, :inter].cpu().float()
    assert_close(out.cpu()[gate > -3], ref[gate > -3], bf16_exact=0.99)
    assert (out.cpu().float() - ref.float())[gate <= -3].abs().max().item() <= 1e-5


def test_other_activations_stay_eager(kernels, monkeypatch):
    def refuse(*args):
        raise AssertionError("no kernel for this activation")

    monkeypatch.setattr(fused_ops, "gated_activation", refuse)
    layer = GatedActivation("gelu")
    assert layer.fused_act is None
    x = torch.randn(2, 8)
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(layer(x), torch.nn.functional.gelu(gate) * up)


def test_dispatch_cpu_stays_eager_unless_sent(monkeypatch):
    """CPU tensors take the eager code by default; `run_on_cpu` (or CUDA tensors) sends them to the kernels."""
    calls = []

    def spy(name):
        real = getattr(fused_ops, name)
        return lambda *a, **kw: calls.append(name) or real(*a, **kw)

    for name in ("rms_norm", "gated_activation", "rotary_embedding"):
        monkeypatch.setattr(fused_ops, name, spy(name))
    norm, act, rope = RMSNorm(8), GatedActivation("silu"), RotaryEmbedding(8, 16, ROPE)

    def run_all(device):
        norm.to(device), rope.to(device)
        x, q = torch.randn(2, 8, device=device), torch.randn(2, 1, 8, device=device)
        pos = torch.tensor([1, 2], device=device)
        norm(x), norm(x, x), act(x), rope(pos, q.clone(), q.clone())

    run_all("cpu")
    assert calls == []
    monkeypatch.setattr(fused_ops, "run_on_cpu", True)
    run_all(DEVICE)
    assert calls == ["rms_norm", "rms_norm", "gated_activation", "rotary_embedding"]


def test_layers_import_without_triton():
    """Triton comes with the first kernel call, not with the layers: CPU-only installs have none, and tests set
    TRITON_INTERPRET after the layers may have been imported."""
    code = "import sys, mmserve.models.llama, mmserve.models.qwen2_vl; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    if DEVICE == "cpu":
        assert fused_ops.interpreting()


def qk_views(tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int):
    """A qkv projection output and its q [T, heads, D], k [T, kv_heads, D] views, as the attention layer splits it."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype).to(DEVICE)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    return qkv, q.reshape(tokens, heads, head_dim), k.reshape(tokens, kv_heads, head_dim)


def check_rotary(rope: RotaryEmbedding, positions: torch.Tensor, dtype: torch.dtype, tokens: int, seed: int) -> None:
    heads, kv_heads, head_dim = 4, 2, rope.head_dim
    qkv, q, k = qk_views(tokens, heads, kv_heads, head_dim, dtype, seed)
    before = qkv.clone()
    ref_q, ref_k = eager(rope, positions, q, k)
    rope, positions = rope.to(DEVICE), positions.to(DEVICE)
    out_q, out_k = rope(positions, q, k)
    # rotated in place: the same storage, v untouched, and the dims past rotary_dim passed through
    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()
    v_cols = (heads + kv_heads) * head_dim
    assert torch.equal(qkv[:, v_cols:], before[:, v_cols:])
    assert not torch.equal(qkv[:, :v_cols], before[:, :v_cols])
    if rope.rotary_dim < head_dim:
        for t, start, n in ((out_q, 0, heads), (out_k, heads * head_dim, kv_heads)):
            rest = before[:, start : start + n * head_dim].reshape(tokens, n, head_dim)[..., rope.rotary_dim :]
            assert torch.equal(t[..., rope.rotary_dim :], rest)
    for out, ref in ((out_q, ref_q), (out_k, ref_k)):
        if dtype == F32:
            assert (out.cpu() - ref).abs().max().item() <= 1e-6
        else:  # every product and sum rounded as eager rounds it
            assert torch.equal(out.cpu(), ref)


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize(("params", "rotary_dim"), [(ROPE, None), (ROPE, 12), (YARN, None)])
def test_rotary_matches_eager_in_place(kernels, dtype, tokens, params, rotary_dim):
    """Full and partial rotary (12 of 20 dims: a half of 6, not a power of two), and yarn's scaled tables."""
    rope = RotaryEmbedding(20, 64, params, rotary_dim=rotary_dim)
    positions = torch.randint(0, 64, (tokens,), generator=torch.Generator().manual_seed(tokens))
    check_rotary(rope, positions, dtype, tokens, seed=tokens)


def test_rotary_with_k_the_same_tensor_rotates_once(kernels):
    rope = RotaryEmbedding(16, 32, ROPE)
    q = torch.randn(3, 2, 16).to(DEVICE)
    positions = torch.tensor([0, 5, 31])
    ref, _ = eager(rope, positions, q, q)
    out_q, out_k = rope.to(DEVICE)(positions.to(DEVICE), q, q)
    assert out_q is q and out_k is q
    assert (q.cpu() - ref).abs().max().item() <= 1e-6


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("interleaved", [False, True])
def test_mrope_matches_eager(kernels, dtype, tokens, interleaved):
    """3-D positions with three different rows, so a band reading the wrong row shows; sections [2, 3, 3] of the
    8 bands (head_dim 16). 1-D positions take the plain path."""
    rope = MRotaryEmbedding(16, 64, ROPE, [2, 3, 3], interleaved=interleaved)
    g = torch.Generator().manual_seed(tokens + interleaved)
    positions = torch.randint(0, 64, (3, tokens), generator=g)
    assert len(set(rope.band_rows.tolist())) == 3
    check_rotary(rope, positions, dtype, tokens, seed=tokens)
    check_rotary(rope, positions[1], dtype, tokens, seed=tokens + 1)
    # a non-contiguous [3, T] (a slice of a wider table, as the scheduler may hand over)
    wide = torch.randint(0, 64, (3, 2 * tokens), generator=g)
    check_rotary(rope, wide[:, ::2], dtype, tokens, seed=tokens + 2)


def test_engine_generates_the_same_with_kernels(tiny_model_dir, monkeypatch):
    """Qwen3 (per-head q/k norms on strided views, rotary in place before the attention reads q) gives the same
    greedy tokens and logits with the kernels (on DEVICE) as with the eager layers (on the CPU)."""
    from mmserve import Engine

    calls = {"rms_norm": 0, "gated_activation": 0, "rotary_embedding": 0}

    def counted(name):
        real = getattr(fused_ops, name)

        def run(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return run

    path = str(tiny_model_dir("qwen3"))
    prompts = ["The quick brown fox jumps over", "Hello"]
    params = {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}
    results = []
    for device in ("cpu", DEVICE):
        if results:  # the second run, through the kernels
            monkeypatch.setattr(fused_ops, "run_on_cpu", True)
            for name in calls:
                monkeypatch.setattr(fused_ops, name, counted(name))
        with Engine(model_path=path, dtype="float32", device=device) as engine:
            results.append(engine.generate(prompts, params, return_logits=True))
    assert all(n > 0 for n in calls.values()), calls
    for eager_out, fused_out in zip(*results, strict=True):
        assert fused_out["output_ids"] == eager_out["output_ids"]
        for a, b in zip(eager_out["meta_info"]["logits"], fused_out["meta_info"]["logits"], strict=True):
            assert (a - b).abs().max().item() < 1e-4
