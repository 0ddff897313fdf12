"""KVPool and ReqToTokenPool: allocation accounting, the dummy slot, K/V storage."""

from __future__ import annotations

import pytest
import torch

from mmserve.cache.kv_pool import KVPool, ReqToTokenPool


def make_pool(size: int = 8, dtype: torch.dtype = torch.float16) -> KVPool:
    return KVPool(size, num_layers=2, num_kv_heads=2, head_dim=4, dtype=dtype, device="cpu")


def test_alloc_free_accounting() -> None:
    pool = make_pool(8)
    assert pool.available_size() == 8
    a = pool.alloc(3)
    assert a is not None and a.dtype == torch.int64 and a.numel() == 3
    assert pool.available_size() == 5
    b = pool.alloc(5)
    assert b is not None and pool.available_size() == 0
    assert sorted(torch.cat((a, b)).tolist()) == list(range(1, 9))
    pool.free(a)
    assert pool.available_size() == 3
    pool.free(torch.empty(0, dtype=torch.int64))
    assert pool.available_size() == 3
    c = pool.alloc(3)
    assert c is not None and sorted(c.tolist()) == sorted(a.tolist())
    empty = pool.alloc(0)
    assert empty is not None and empty.numel() == 0


def test_alloc_beyond_capacity_allocates_nothing() -> None:
    pool = make_pool(4)
    assert pool.alloc(5) is None
    assert pool.available_size() == 4
    assert pool.alloc(3) is not None
    assert pool.alloc(2) is None
    assert pool.available_size() == 1


def test_slot_zero_never_allocated() -> None:
    pool = make_pool(6)
    for _ in range(3):
        slots = pool.alloc(6)
        assert slots is not None
        assert 0 not in slots.tolist()
        assert slots.min().item() >= 1 and slots.max().item() <= 6
        pool.free(slots.flip(0))
    assert pool.k_buffers[0].shape == (7, 2, 4)


def test_set_get_kv_roundtrip_with_cast() -> None:
    pool = make_pool(8, dtype=torch.bfloat16)
    slots = pool.alloc(3)
    assert slots is not None
    k = torch.randn(3, 2, 4, dtype=torch.float32)
    v = torch.randn(3, 2, 4, dtype=torch.float32)
    pool.set_kv(1, slots, k, v)
    kb, vb = pool.get_kv(1)
    assert kb.dtype == torch.bfloat16 and kb.shape == (9, 2, 4)
    torch.testing.assert_close(kb[slots], k.to(torch.bfloat16))
    torch.testing.assert_close(vb[slots], v.to(torch.bfloat16))
    # Other layers and other slots are untouched.
    assert pool.get_kv(0)[0].abs().sum() == 0
    assert kb[0].abs().sum() == 0


def test_v_head_dim() -> None:
    pool = KVPool(4, num_layers=1, num_kv_heads=1, head_dim=8, dtype=torch.float32, device="cpu",
                  v_head_dim=6)
    assert pool.k_buffers[0].shape == (5, 1, 8)
    assert pool.v_buffers[0].shape == (5, 1, 6)


def test_bytes_per_token() -> None:
    assert KVPool.bytes_per_token(2, 4, 64, torch.float16) == 2 * 4 * 64 * 2 * 2
    assert KVPool.bytes_per_token(3, 1, 8, torch.float32, v_head_dim=4) == 3 * 1 * (8 + 4) * 4
    pool = make_pool(10)
    actual = sum(t.numel() * t.element_size() for t in pool.k_buffers + pool.v_buffers)
    assert actual == 11 * KVPool.bytes_per_token(2, 2, 4, torch.float16)


def test_req_to_token_pool_alloc_free_reuse() -> None:
    pool = ReqToTokenPool(3, max_context_len=16, device="cpu")
    # three rows to hand out and the padding row, which never is
    assert pool.req_to_token.shape == (4, 16) and pool.req_to_token.dtype == torch.int64
    assert pool.req_to_token.abs().sum() == 0 and pool.padding_row == 3
    rows = [pool.alloc() for _ in range(3)]
    assert sorted(rows) == [0, 1, 2]  # type: ignore[type-var]
    assert pool.available_size() == 0
    assert pool.alloc() is None
    pool.free(1)
    assert pool.available_size() == 1
    assert pool.alloc() == 1
    assert pool.alloc() is None
    with pytest.raises(ValueError):
        pool.free(3)
