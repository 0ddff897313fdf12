"""The Triton attention backend against the torch reference: paged decode and extend on random KV pools (GQA
ratios, head dims, sliding windows, cached prefixes, float32 and bfloat16), and whole models generating the same
greedy tokens with either backend.

Without a GPU the kernels run in Triton's interpreter on CPU tensors, which is slow per program: shapes stay small,
and the backend is built with small blocks and splits so that short sequences still cross several of each.
"""

from __future__ import annotations

import pytest
import torch

from mmserve import Engine
from mmserve.attention import triton_kernels
from mmserve.attention.base import Attention, create_attention_backend
from mmserve.attention.torch_backend import TorchAttentionBackend
from mmserve.attention.triton_backend import TritonAttentionBackend
from mmserve.attention.triton_kernels import DecodeBlocks, ExtendBlocks, decode_attention
from mmserve.cache.kv_pool import KVPool, ReqToTokenPool
from mmserve.forward_batch import ForwardBatch, ForwardMode

# without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET, set by tests/conftest.py)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
TOLERANCE = {F32: 2e-5, F16: 4e-3, BF16: 3e-2}


def small_backend() -> TritonAttentionBackend:
    """Blocks of 16 keys and queries, splits of at least 8 keys (at most 4): lengths of a few dozen cross several."""
    return TritonAttentionBackend(DEVICE, max_kv_splits=4, min_split_len=8, decode_blocks=DecodeBlocks(16, 4, 1),
                                  extend_blocks=ExtendBlocks(16, 16, 4, 1))


def compare(mode: ForwardMode, lens: list[tuple[int, int]], heads: int, kv_heads: int, head_dim: int,
            window: int | None, dtype: torch.dtype, backend: TritonAttentionBackend | None = None,
            q_scale: float = 1.0, seed: int = 0) -> None:
    """Run one layer's attention with both backends on a random pool; `lens` is (seq_len, extend_len) per request.

    Slots are a random permutation of the pool (so nothing is contiguous), requests use scattered rows of the
    request table, and q is a strided view as the model's qkv split produces it."""
    g = torch.Generator().manual_seed(seed)
    total = sum(s for s, _ in lens)
    pool = KVPool(total + 16, 1, kv_heads, head_dim, dtype, DEVICE)
    for buf in (pool.k_buffers[0], pool.v_buffers[0]):
        buf.copy_(torch.randn(buf.shape, generator=g).to(dtype))
    table = ReqToTokenPool(2 * len(lens) + 1, max(s for s, _ in lens) + 3, DEVICE)
    slots = (torch.randperm(total + 16, generator=g)[:total] + 1).to(DEVICE)
    rows = [2 * i + 1 for i in range(len(lens))]
    out_loc, offset = [], 0
    for row, (seq_len, extend_len) in zip(rows, lens, strict=True):
        table.req_to_token[row, :seq_len] = slots[offset : offset + seq_len]
        out_loc.append(slots[offset + seq_len - extend_len : offset + seq_len])
        offset += seq_len
    tokens = sum(e for _, e in lens)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype).to(DEVICE)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=1)
    q = q * q_scale
    layer = Attention(heads, head_dim, kv_heads, 0, sliding_window=window)
    outs = []
    for be in (TorchAttentionBackend(), backend or small_backend()):
        batch = ForwardBatch(
            mode=mode, input_ids=torch.zeros(tokens, dtype=torch.int64, device=DEVICE),
            positions=torch.zeros(tokens, dtype=torch.int64, device=DEVICE), out_cache_loc=torch.cat(out_loc),
            req_pool_indices=torch.tensor(rows, device=DEVICE),
            seq_lens=torch.tensor([s for s, _ in lens], device=DEVICE), seq_lens_cpu=[s for s, _ in lens],
            extend_lens_cpu=[e for _, e in lens], logits_indices=None,
        )
        be.bind(pool, table.req_to_token).init_forward_metadata(batch)
        outs.append(be.forward(q, k, v, layer, batch).float())
    expected, got = outs
    assert got.shape == expected.shape == (tokens, heads * head_dim)
    assert not got.isnan().any() and not got.isinf().any()
    torch.testing.assert_close(got, expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


# (heads, kv_heads, head_dim, window, dtype): GQA ratios 1, 2, 3, 4; head dims 64, 80, 128 and a tiny 8 (padded to
# tl.dot's 16 on a GPU: a tiny test tower's); windows; dtypes
CASES = [
    (4, 4, 64, None, F32),
    (2, 2, 8, None, F32),
    (4, 2, 64, 7, F32),
    (8, 2, 128, None, F32),
    (6, 2, 64, 20, F32),
    (8, 2, 128, 16, BF16),
    (4, 1, 80, None, BF16),
    (4, 2, 64, None, F16),
]
CASE_IDS = [f"h{h}kv{kv}d{d}-w{w}-{str(t).removeprefix('torch.')}" for h, kv, d, w, t in CASES]


@pytest.mark.parametrize("heads,kv_heads,head_dim,window,dtype", CASES, ids=CASE_IDS)
def test_decode_matches_torch(heads, kv_heads, head_dim, window, dtype):
    # lengths 1 (a single key), below one block, across blocks, across splits, and a window's edge
    lens = [(1, 1), (5, 1), (40, 1), (17, 1), (70, 1)]
    compare(ForwardMode.DECODE, lens, heads, kv_heads, head_dim, window, dtype)


@pytest.mark.parametrize("heads,kv_heads,head_dim,window,dtype", CASES, ids=CASE_IDS)
def test_extend_matches_torch(heads, kv_heads, head_dim, window, dtype):
    # whole prompts and chunks over cached prefixes, one token after a long prefix, several query blocks
    lens = [(5, 5), (40, 20), (17, 3), (1, 1), (50, 37), (9, 1)]
    compare(ForwardMode.EXTEND, lens, heads, kv_heads, head_dim, window, dtype)


def test_extend_without_prefix_single_request():
    compare(ForwardMode.EXTEND, [(45, 45)], 4, 2, 64, None, F32)
    compare(ForwardMode.EXTEND, [(45, 45)], 4, 2, 64, 10, BF16)


def test_dense_prefill_of_fresh_prompts_matches_torch():
    """The CUDA default for prompts with nothing cached: torch's flash attention (packed prompts, half precision)
    or its SDPA (one prompt otherwise) over the step's own keys and values; the kernel for the rest (a cached
    prefix anywhere in the batch, a window shorter than a prompt, several float32 prompts)."""
    dense = TritonAttentionBackend(DEVICE, dense_prefill=True)
    compare(ForwardMode.EXTEND, [(45, 45)], 4, 2, 64, None, F32, backend=dense)
    compare(ForwardMode.EXTEND, [(45, 45)], 4, 2, 64, 10, F32, backend=dense)  # the window: the kernel
    compare(ForwardMode.EXTEND, [(40, 20)], 4, 2, 64, None, F32, backend=dense)  # a prefix: the kernel
    for dtype in (BF16, F16):
        compare(ForwardMode.EXTEND, [(45, 45), (3, 3), (30, 30), (1, 1)], 8, 2, 128, None, dtype, backend=dense)
        compare(ForwardMode.EXTEND, [(45, 45), (17, 17)], 4, 4, 64, 64, dtype, backend=dense)  # window >= prompts
        compare(ForwardMode.EXTEND, [(45, 45), (17, 9)], 4, 2, 64, None, dtype, backend=dense)  # one has a prefix
    compare(ForwardMode.EXTEND, [(45, 45), (3, 3)], 4, 2, 64, None, F32, backend=dense)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_store_kv_writes_each_row_to_its_slot(dtype):
    """The Triton store of a step's K and V (strided views of a qkv projection, as the models pass them) into
    scattered slots equals indexed assignment, and touches nothing else; layouts it does not take are refused."""
    g = torch.Generator().manual_seed(3)
    tokens, kv_heads, head_dim = 7, 2, 40
    qkv = torch.randn(tokens, (4 + 2 * kv_heads) * head_dim, generator=g).to(dtype).to(DEVICE)
    _, k, v = qkv.split([4 * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=1)
    k, v = k.view(tokens, kv_heads, head_dim), v.view(tokens, kv_heads, head_dim)
    loc = (torch.randperm(30, generator=g)[:tokens] + 1).to(DEVICE)
    want = KVPool(30, 1, kv_heads, head_dim, dtype, DEVICE)
    want.set_kv(0, loc, k, v)
    got = KVPool(30, 1, kv_heads, head_dim, dtype, DEVICE)
    assert triton_kernels.store_kv(k, v, got.k_buffers[0], got.v_buffers[0], loc)
    assert torch.equal(got.k_buffers[0], want.k_buffers[0]) and torch.equal(got.v_buffers[0], want.v_buffers[0])
    assert got.k_buffers[0].abs().sum() > 0
    transposed = k.transpose(1, 2).contiguous().transpose(1, 2)  # heads not contiguous within a row
    assert not triton_kernels.store_kv(transposed, v, got.k_buffers[0], got.v_buffers[0], loc)


def test_peaked_softmax_stays_finite():
    """Large logits (a near one-hot softmax) in every mode: the online max and split merge must not overflow."""
    compare(ForwardMode.DECODE, [(3, 1), (66, 1)], 4, 2, 64, None, F32, q_scale=30.0)
    compare(ForwardMode.EXTEND, [(30, 30), (66, 18)], 4, 2, 64, 9, F32, q_scale=30.0)
    compare(ForwardMode.DECODE, [(3, 1), (66, 1)], 4, 2, 64, 5, BF16, q_scale=30.0)


def test_window_of_one_sees_only_itself():
    compare(ForwardMode.EXTEND, [(20, 12)], 4, 2, 64, 1, F32)
    compare(ForwardMode.DECODE, [(20, 1)], 4, 2, 64, 1, F32)


def test_default_blocks_and_splits():
    """The production configuration (blocks of 64, splits of >= 64 keys): 90 keys take two of each."""
    backend = TritonAttentionBackend(DEVICE)
    compare(ForwardMode.DECODE, [(3, 1), (90, 1)], 8, 2, 128, None, BF16, backend=backend)
    compare(ForwardMode.EXTEND, [(90, 40), (7, 7)], 8, 2, 128, 32, BF16, backend=backend)


def test_many_splits_merge_exactly():
    """Splits of 8 keys over 70: up to 4 partial results per head merged by the reduce kernel."""
    backend = TritonAttentionBackend(DEVICE, max_kv_splits=4, min_split_len=8, decode_blocks=DecodeBlocks(16, 4, 1))
    compare(ForwardMode.DECODE, [(70, 1), (8, 1), (9, 1), (33, 1)], 4, 2, 64, None, F32, backend=backend)
    compare(ForwardMode.DECODE, [(70, 1), (33, 1)], 4, 2, 64, 30, F32, backend=backend)


def test_decode_padding_row_of_length_zero_gives_zeros():
    """CUDA-graph padding: a row of length 0 reads nothing and returns zeros; its neighbours are unaffected."""
    g = torch.Generator().manual_seed(3)
    k_buf, v_buf = torch.randn(2, 41, 2, 64, generator=g).to(DEVICE)
    table = torch.zeros(3, 20, dtype=torch.int64, device=DEVICE)
    slots = (torch.randperm(40, generator=g) + 1).to(DEVICE)
    table[0, :12], table[2, :7] = slots[:12], slots[12:19]
    seq_lens = torch.tensor([12, 0, 7], device=DEVICE)
    q = torch.randn(3, 4, 64, generator=g).to(DEVICE)
    out = decode_attention(q, k_buf, v_buf, table, torch.arange(3, device=DEVICE), seq_lens, 0.125, None,
                           max_splits=4, min_split_len=4, blocks=DecodeBlocks(16, 4, 1))
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    for i in (0, 2):
        idx = table[i, : int(seq_lens[i])]
        k, v = k_buf[idx].repeat_interleave(2, dim=1), v_buf[idx].repeat_interleave(2, dim=1)  # [n, heads, 64]
        weights = torch.softmax(torch.einsum("hd,nhd->hn", q[i], k) * 0.125, dim=-1)
        torch.testing.assert_close(out[i], torch.einsum("hn,nhd->hd", weights, v), atol=2e-5, rtol=2e-5)


def test_create_attention_backend_and_refusals(monkeypatch):
    assert isinstance(create_attention_backend("triton", torch.device(DEVICE)), TritonAttentionBackend)
    auto = TritonAttentionBackend if torch.device(DEVICE).type == "cuda" else TorchAttentionBackend
    assert isinstance(create_attention_backend("auto", torch.device(DEVICE)), auto)
    assert isinstance(create_attention_backend("auto", torch.device("cpu")), TorchAttentionBackend)
    # a model that caps its attention logits (Gemma 2) gets the torch backend even on a GPU
    assert isinstance(create_attention_backend("auto", torch.device("cuda"), logit_cap=True), TorchAttentionBackend)
    with pytest.raises(ValueError, match="available: torch, triton"):
        create_attention_backend("flash", torch.device(DEVICE))
    monkeypatch.setattr(triton_kernels, "interpreting", lambda: False)  # as on a machine without TRITON_INTERPRET
    with pytest.raises(ValueError, match="needs a CUDA device"):
        TritonAttentionBackend("cpu")


GREEDY = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_engine_generates_the_same_tokens(tiny_model_dir, family):
    """Whole models (Mistral with a window of 8 shorter than the prompts) give the same greedy tokens with either
    backend: batched prefill, a shared prefix from the radix cache, chunked prefill and batched decode."""
    path = str(tiny_model_dir(family))
    prompts = ["The quick brown fox jumps over the lazy dog again", "Hello", "The quick brown fox sleeps"]
    outputs = {}
    for backend in ("torch", "triton"):
        with Engine(model_path=path, dtype="float32", attention_backend=backend, chunked_prefill_size=8,
                    device=DEVICE) as engine:
            first = engine.generate(prompts, GREEDY)
            again = engine.generate(prompts[2], GREEDY)  # most of its prompt now comes from the cache
            assert again["meta_info"]["cached_tokens"] > 0
            outputs[backend] = [r["output_ids"] for r in first] + [again["output_ids"]]
    assert outputs["triton"] == outputs["torch"]
