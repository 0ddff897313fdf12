"""RadixCache: prefix matching, splitting, duplicate accounting, locking, LRU eviction, size counters."""

from __future__ import annotations

import random

import torch

from mmserve.cache.kv_pool import KVPool
from mmserve.cache.radix_cache import RadixCache, TreeNode


def make_cache(size: int = 64, disable: bool = False) -> tuple[KVPool, RadixCache]:
    pool = KVPool(size, num_layers=1, num_kv_heads=1, head_dim=2, dtype=torch.float32, device="cpu")
    return pool, RadixCache(pool, disable=disable)


def put(pool: KVPool, cache: RadixCache, key: list[int]) -> torch.Tensor:
    """What a finished request does: fresh slots for the whole key, insert, free the duplicates."""
    slots = pool.alloc(len(key))
    assert slots is not None
    dup = cache.insert(key, slots)
    pool.free(slots[:dup])
    return slots


def all_nodes(cache: RadixCache) -> list[TreeNode]:
    out, stack = [], list(cache.root.children.values())
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend(node.children.values())
    return out


def test_insert_and_exact_match() -> None:
    pool, cache = make_cache()
    slots = put(pool, cache, [1, 2, 3, 4])
    got, node = cache.match_prefix([1, 2, 3, 4])
    assert got.tolist() == slots.tolist() and got.dtype == torch.int64
    assert node.key == [1, 2, 3, 4]
    assert cache.total_size() == 4 and cache.evictable_size() == 4
    got, node = cache.match_prefix([1, 2, 3, 4, 5, 6])
    assert got.tolist() == slots.tolist()
    got, node = cache.match_prefix([9, 9])
    assert got.numel() == 0 and node is cache.root
    assert cache.match_prefix([])[0].numel() == 0


def test_partial_match_splits() -> None:
    pool, cache = make_cache()
    slots = put(pool, cache, [1, 2, 3, 4, 5])
    got, node = cache.match_prefix([1, 2, 3, 7])
    assert got.tolist() == slots[:3].tolist()
    assert node.key == [1, 2, 3] and node.parent is cache.root
    assert list(node.children) == [4]
    tail = node.children[4]
    assert tail.key == [4, 5] and tail.value.tolist() == slots[3:].tolist() and tail.parent is node
    assert cache.total_size() == 5 and cache.evictable_size() == 5
    # The full key still matches across the split.
    assert cache.match_prefix([1, 2, 3, 4, 5])[0].tolist() == slots.tolist()


def test_insert_returns_duplicate_prefix_length() -> None:
    pool, cache = make_cache(32)
    put(pool, cache, [1, 2, 3])
    free_before = pool.available_size()
    slots = pool.alloc(5)
    assert slots is not None
    assert cache.insert([1, 2, 3, 4, 5], slots) == 3
    pool.free(slots[:3])
    assert pool.available_size() == free_before - 2
    assert cache.total_size() == 5
    assert cache.match_prefix([1, 2, 3, 4, 5])[0][3:].tolist() == slots[3:].tolist()
    # Fully cached key (ending inside an edge) -> everything is a duplicate, nothing stored.
    dup_slots = pool.alloc(2)
    assert dup_slots is not None
    assert cache.insert([1, 2], dup_slots) == 2
    assert cache.total_size() == 5
    assert cache.insert([], torch.empty(0, dtype=torch.int64)) == 0


def test_insert_copies_value() -> None:
    pool, cache = make_cache()
    row = torch.zeros(8, dtype=torch.int64)
    slots = pool.alloc(3)
    assert slots is not None
    row[:3] = slots
    cache.insert([5, 6, 7], row[:3])
    row.zero_()  # the request's row is reused; the tree must not see it
    assert cache.match_prefix([5, 6, 7])[0].tolist() == slots.tolist()


def test_two_branches_share_prefix() -> None:
    pool, cache = make_cache()
    a = put(pool, cache, [1, 2, 3, 4])
    b_slots = pool.alloc(4)
    assert b_slots is not None
    assert cache.insert([1, 2, 8, 9], b_slots) == 2
    pool.free(b_slots[:2])
    assert cache.total_size() == 6
    assert cache.match_prefix([1, 2, 3, 4])[0].tolist() == a.tolist()
    assert cache.match_prefix([1, 2, 8, 9])[0].tolist() == a[:2].tolist() + b_slots[2:].tolist()
    shared = cache.root.children[1]
    assert shared.key == [1, 2] and sorted(shared.children) == [3, 8]
    assert "len=2" in cache.pretty_print()


def test_large_key_values() -> None:
    pool, cache = make_cache()
    big = [2**62 + 7, 2**62 + 7, 123456789012345]
    slots = put(pool, cache, [1, *big, 2])
    assert cache.match_prefix([1, *big, 3])[0].tolist() == slots[:4].tolist()


def test_lock_prevents_eviction() -> None:
    pool, cache = make_cache(16)
    put(pool, cache, [1, 2, 3])
    put(pool, cache, [4, 5])
    _, node = cache.match_prefix([1, 2, 3])
    cache.inc_lock_ref(node)
    assert cache.protected_size() == 3 and cache.evictable_size() == 2
    assert cache.evict(100) == 2
    assert cache.total_size() == 3
    assert cache.match_prefix([1, 2, 3])[0].numel() == 3
    cache.dec_lock_ref(node)
    assert cache.protected_size() == 0 and cache.evictable_size() == 3
    assert cache.evict(100) == 3
    assert cache.total_size() == 0 and pool.available_size() == 16


def test_lock_on_split_node() -> None:
    pool, cache = make_cache(16)
    put(pool, cache, [1, 2, 3, 4])
    _, leaf = cache.match_prefix([1, 2, 3, 4])
    cache.inc_lock_ref(leaf)
    _, mid = cache.match_prefix([1, 2])  # splits a locked node
    assert mid.lock_ref == 1 and leaf.lock_ref == 1
    assert cache.protected_size() == 4 and cache.evictable_size() == 0
    cache.dec_lock_ref(leaf)
    assert mid.lock_ref == 0 and cache.evictable_size() == 4


def test_lru_eviction_order() -> None:
    pool, cache = make_cache(16)
    put(pool, cache, [1, 1])
    put(pool, cache, [2, 2])
    cache.match_prefix([1, 1])  # touch the older one
    assert cache.evict(1) == 2
    assert cache.match_prefix([1, 1])[0].numel() == 2
    assert cache.match_prefix([2, 2])[0].numel() == 0


def test_evict_frees_slots_to_pool() -> None:
    pool, cache = make_cache(16)
    put(pool, cache, [1, 2, 3, 4, 5])
    assert pool.available_size() == 11
    assert cache.evict(3) == 5  # whole leaf goes
    assert pool.available_size() == 16
    assert cache.evict(3) == 0


def test_parent_becomes_evictable_after_children() -> None:
    pool, cache = make_cache(16)
    put(pool, cache, [1, 2, 3])
    put(pool, cache, [1, 2, 4])
    assert len(cache.root.children[1].children) == 2
    assert cache.evict(2) == 2  # both single-token leaves; [1, 2] remains
    assert cache.total_size() == 2
    assert cache.evict(1) == 2  # now the former parent is a leaf
    assert cache.total_size() == 0 and pool.available_size() == 16
    # All in one call too.
    put(pool, cache, [1, 2, 3])
    put(pool, cache, [1, 2, 4])
    assert cache.evict(100) == 4 and pool.available_size() == 16


def test_reset_frees_everything() -> None:
    pool, cache = make_cache(16)
    put(pool, cache, [1, 2, 3])
    put(pool, cache, [1, 5])
    cache.reset()
    assert pool.available_size() == 16
    assert cache.total_size() == cache.evictable_size() == cache.protected_size() == 0
    assert cache.match_prefix([1, 2, 3])[0].numel() == 0


def test_disable() -> None:
    pool, cache = make_cache(16, disable=True)
    slots = pool.alloc(3)
    assert slots is not None
    assert cache.insert([1, 2, 3], slots) == 3  # caller frees everything
    pool.free(slots[:3])
    got, node = cache.match_prefix([1, 2, 3])
    assert got.numel() == 0 and node is cache.root
    cache.inc_lock_ref(node)
    cache.dec_lock_ref(node)
    assert cache.total_size() == 0 and cache.evict(10) == 0
    assert pool.available_size() == 16


def check_invariants(pool: KVPool, cache: RadixCache, held: list[TreeNode]) -> None:
    nodes = all_nodes(cache)
    expected_locks: dict[int, int] = {}
    for node in held:
        while node is not cache.root:
            expected_locks[id(node)] = expected_locks.get(id(node), 0) + 1
            assert node.parent is not None
            node = node.parent
    evictable = protected = 0
    for node in nodes:
        assert len(node.key) == node.value.numel() > 0
        assert node.parent is not None and node.parent.children[node.key[0]] is node
        assert node.lock_ref == expected_locks.get(id(node), 0)
        if node.lock_ref:
            protected += len(node.key)
        else:
            evictable += len(node.key)
    assert cache.evictable_size() == evictable
    assert cache.protected_size() == protected
    assert cache.total_size() == evictable + protected
    everything = torch.cat([pool.free_slots, *(n.value for n in nodes)])
    assert sorted(everything.tolist()) == list(range(1, pool.size + 1))


def test_random_ops_keep_counters_and_slots_consistent() -> None:
    rng = random.Random(1234)
    pool, cache = make_cache(40)
    held: list[TreeNode] = []
    alphabet = [0, 1, 2, 2**61 + 3]

    for _ in range(400):
        op = rng.random()
        if op < 0.5:
            # A request: lock its cached prefix, allocate the rest, insert, keep the final node locked.
            key = [rng.choice(alphabet) for _ in range(rng.randint(1, 8))]
            prefix, node = cache.match_prefix(key)
            cache.inc_lock_ref(node)
            need = len(key) - prefix.numel()
            new = pool.alloc(need)
            if new is None:
                cache.evict(need - pool.available_size())
                new = pool.alloc(need)
            if new is None:
                cache.dec_lock_ref(node)
            else:
                value = torch.cat((prefix, new))
                dup = cache.insert(key, value)
                assert dup >= prefix.numel()
                pool.free(value[prefix.numel():dup])
                got, final = cache.match_prefix(key)
                assert got.numel() == len(key)
                cache.inc_lock_ref(final)
                cache.dec_lock_ref(node)
                held.append(final)
        elif op < 0.65:
            key = [rng.choice(alphabet) for _ in range(rng.randint(1, 8))]
            cache.match_prefix(key)
        elif op < 0.85:
            if held:
                cache.dec_lock_ref(held.pop(rng.randrange(len(held))))
        else:
            before = pool.available_size()
            freed = cache.evict(rng.randint(1, 10))
            assert pool.available_size() == before + freed
        check_invariants(pool, cache, held)

    for node in held:
        cache.dec_lock_ref(node)
    cache.evict(10**9)
    assert cache.total_size() == 0 and pool.available_size() == 40
