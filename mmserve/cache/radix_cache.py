"""Prefix cache: a token-level radix tree (page size 1) from token-id sequences to KV slots.

The tree owns the KV slots stored in its nodes and returns them to the `KVPool` when it evicts. Requests
that are using a cached prefix lock the node where their prefix ends (and so every ancestor), which keeps
those slots from being evicted while they are read.

Keys are lists of ints. They are compared only for equality, so they may hold values far outside the
vocabulary (e.g. hashes standing for image content).

Ownership protocol with the caller (the scheduler):

* `match_prefix(key)` returns the slots of the longest cached prefix; they stay owned by the tree.
* `insert(key, value)` returns `n`, how many leading tokens of `key` were already cached. The tree keeps
  its own slots for that part and takes ownership of `value[n:]`. The caller's slots in `value[:n]` are
  duplicates it must free, except for any leading part it obtained from `match_prefix` (those are the
  tree's own slots): with `prefix_len` slots from a locked match, free `value[prefix_len:n]`.
* With `disable=True` nothing is stored: `match_prefix` returns an empty prefix at the root and `insert`
  returns `len(key)`, i.e. "everything is a duplicate, free it all". The caller's freeing logic is then
  identical with the cache on or off.
"""

from __future__ import annotations

import heapq
import itertools

import torch

from mmserve.cache.kv_pool import KVPool


class TreeNode:
    """One edge of the radix tree: a run of tokens and their KV slots.

    `lock_ref` counts the locks held on this node or any descendant; a node with lock_ref > 0 is never
    evicted. `last_access` is a logical clock value (larger = more recent) used for LRU eviction.
    """

    _ids = itertools.count()

    def __init__(self, key: list[int], value: torch.Tensor, parent: TreeNode | None,
                 lock_ref: int = 0, last_access: int = 0) -> None:
        self.key: list[int] = key
        self.value: torch.Tensor = value
        self.parent: TreeNode | None = parent
        self.children: dict[int, TreeNode] = {}
        self.lock_ref: int = lock_ref
        self.last_access: int = last_access
        # Breaks LRU ties deterministically (older node first) so eviction order does not depend on id().
        self.id: int = next(TreeNode._ids)

    def __len__(self) -> int:
        return len(self.key)

    def __repr__(self) -> str:
        return f"TreeNode(id={self.id}, len={len(self.key)}, lock_ref={self.lock_ref})"


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    # A whole-slice comparison runs in C and is the common case (the full edge matches).
    if a[:n] == b[:n]:
        return n
    i = 0
    while a[i] == b[i]:
        i += 1
    return i


class RadixCache:
    """Radix tree of cached token prefixes with LRU eviction into a `KVPool` (see the module docstring)."""

    def __init__(self, kv_pool: KVPool, disable: bool = False) -> None:
        self.kv_pool: KVPool = kv_pool
        self.disable: bool = disable
        self.device: torch.device = kv_pool.device
        self._clock = itertools.count(1)
        self.reset_tree()

    # ----------------------------------------------------------------- state

    def reset_tree(self) -> None:
        """Start from an empty tree without freeing anything (used by __init__ and reset)."""
        # The root is permanently locked so lock/evict walks never need to special-case it for counters.
        self.root: TreeNode = TreeNode([], self._empty(), None, lock_ref=1)
        # Every non-root node without children; eviction candidates are the unlocked ones among them.
        self._leaves: set[TreeNode] = set()
        self._evictable_size: int = 0
        self._protected_size: int = 0
        self._total_size: int = 0

    def reset(self) -> None:
        """Drop every cached prefix and return all of its slots to the pool."""
        slots = [node.value for node in self._iter_nodes() if node is not self.root]
        if slots:
            self.kv_pool.free(torch.cat(slots))
        self.reset_tree()

    def _empty(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.int64, device=self.device)

    def _tick(self) -> int:
        return next(self._clock)

    def _iter_nodes(self) -> list[TreeNode]:
        out: list[TreeNode] = []
        stack = [self.root]
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out

    # ----------------------------------------------------------------- lookup / insert

    def match_prefix(self, key: list[int]) -> tuple[torch.Tensor, TreeNode]:
        """Longest cached prefix of `key`: (its slots, possibly empty; the node where the match ends).

        A match ending inside an edge splits that edge, so the returned node always covers exactly the
        matched tokens and can be locked on its own.
        """
        if self.disable or not key:
            return self._empty(), self.root
        now = self._tick()
        node = self.root
        pos = 0
        parts: list[torch.Tensor] = []
        while pos < len(key):
            child = node.children.get(key[pos])
            if child is None:
                break
            child.last_access = now
            m = _common_prefix_len(child.key, key[pos:pos + len(child.key)])
            partial = m < len(child.key)
            if partial:
                child = self._split(child, m)
            parts.append(child.value)
            node = child
            pos += m
            if partial:
                break
        if not parts:
            return self._empty(), node
        return (parts[0] if len(parts) == 1 else torch.cat(parts)), node

    def insert(self, key: list[int], value: torch.Tensor) -> int:
        """Cache `key` -> `value` (KV slots, same length); returns how many leading tokens were cached.

        The tree takes ownership of `value[returned:]`; see the module docstring for what the caller frees.
        With `disable=True` nothing is stored and `len(key)` is returned.
        """
        if len(key) != value.numel():
            raise ValueError(f"key has {len(key)} tokens but value has {value.numel()} slots")
        if self.disable:
            return len(key)
        if not key:
            return 0
        key = list(key)
        now = self._tick()
        node = self.root
        pos = 0
        while pos < len(key):
            child = node.children.get(key[pos])
            if child is None:
                break
            child.last_access = now
            m = _common_prefix_len(child.key, key[pos:pos + len(child.key)])
            pos += m
            if m < len(child.key):
                if pos == len(key):
                    # The key ends inside this edge: everything is cached, no need to split.
                    return pos
                child = self._split(child, m)
            node = child
        if pos < len(key):
            self._add_leaf(node, key[pos:], value[pos:], now)
        return pos

    def _add_leaf(self, parent: TreeNode, key: list[int], value: torch.Tensor, now: int) -> None:
        # Clone: the caller often passes a view of a req_to_token row, which is reused by the next request.
        value = value.to(device=self.device, dtype=torch.int64).clone()
        leaf = TreeNode(key, value, parent, lock_ref=0, last_access=now)
        parent.children[key[0]] = leaf
        self._leaves.discard(parent)
        self._leaves.add(leaf)
        self._evictable_size += len(key)
        self._total_size += len(key)

    def _split(self, child: TreeNode, m: int) -> TreeNode:
        """Cut `child`'s edge after `m` tokens; returns the new upper node (which ends at the cut)."""
        parent = child.parent
        assert parent is not None and 0 < m < len(child.key)
        # The upper part inherits lock_ref: every lock counted on `child` also passes through it.
        upper = TreeNode(child.key[:m], child.value[:m], parent, lock_ref=child.lock_ref,
                         last_access=child.last_access)
        child.key = child.key[m:]
        child.value = child.value[m:]
        child.parent = upper
        upper.children[child.key[0]] = child
        parent.children[upper.key[0]] = upper
        # Sizes are unchanged: both parts have the same lock state, and `child` stays a leaf iff it was.
        return upper

    # ----------------------------------------------------------------- locking

    def inc_lock_ref(self, node: TreeNode) -> None:
        """Protect `node` and its ancestors (not the root) from eviction."""
        while node is not self.root:
            if node.lock_ref == 0:
                self._evictable_size -= len(node.key)
                self._protected_size += len(node.key)
            node.lock_ref += 1
            assert node.parent is not None
            node = node.parent

    def dec_lock_ref(self, node: TreeNode) -> None:
        """Undo one `inc_lock_ref(node)`."""
        while node is not self.root:
            if node.lock_ref <= 0:
                raise RuntimeError(f"dec_lock_ref on unlocked {node!r}")
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._protected_size -= len(node.key)
                self._evictable_size += len(node.key)
            assert node.parent is not None
            node = node.parent

    # ----------------------------------------------------------------- eviction

    def evict(self, num_tokens: int) -> int:
        """Free unlocked leaves, least recently used first, until `num_tokens` are freed or none remain.

        Returns the number of slots returned to the pool (may exceed `num_tokens` by up to one leaf).
        """
        if self.disable or num_tokens <= 0:
            return 0
        heap = [(n.last_access, n.id, n) for n in self._leaves if n.lock_ref == 0]
        heapq.heapify(heap)
        freed = 0
        released: list[torch.Tensor] = []
        while freed < num_tokens and heap:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            assert parent is not None
            del parent.children[leaf.key[0]]
            self._leaves.discard(leaf)
            released.append(leaf.value)
            freed += len(leaf.key)
            self._evictable_size -= len(leaf.key)
            self._total_size -= len(leaf.key)
            if parent is not self.root and not parent.children:
                self._leaves.add(parent)
                if parent.lock_ref == 0:
                    heapq.heappush(heap, (parent.last_access, parent.id, parent))
        if released:
            # One concatenation for the whole eviction instead of one per leaf.
            self.kv_pool.free(torch.cat(released))
        return freed

    # ----------------------------------------------------------------- sizes / debug

    def evictable_size(self) -> int:
        """Tokens held by unlocked nodes (evictable now or once their descendants go)."""
        return self._evictable_size

    def protected_size(self) -> int:
        """Tokens held by locked nodes."""
        return self._protected_size

    def total_size(self) -> int:
        return self._total_size

    def pretty_print(self) -> str:
        """An indented dump of the tree, one node per line, for debugging."""
        lines = [f"<root> total={self._total_size} evictable={self._evictable_size} "
                 f"protected={self._protected_size}"]

        # Iterative so a long chain of branch points cannot hit the recursion limit.
        stack: list[tuple[TreeNode, int]] = [(self.root, 0)]
        while stack:
            node, depth = stack.pop()
            if node is not self.root:
                shown = node.key if len(node.key) <= 8 else [*node.key[:8], "..."]
                lines.append(f"{'  ' * depth}{shown} len={len(node.key)} lock={node.lock_ref} "
                             f"t={node.last_access}")
            stack.extend((c, depth + 1) for c in reversed(list(node.children.values())))
        return "\n".join(lines)
