"""EncoderCache: vision-encoder outputs kept by media hash (LRU, bounded in bytes), so an image is encoded once
even when chunked prefill splits its tokens across steps or another request sends the same image.

Entries can be pinned (counted per hash): a pinned entry is never evicted. The scheduler pins the items of a
prompt being prefilled in chunks until its last chunk has run, and a step pins the items it places while it
encodes the others, so that neither a later chunk nor the same step ever finds its item gone.
"""

from __future__ import annotations

import torch

from mmserve.cache.pinned import PinnedCache


class EncoderCache(PinnedCache[torch.Tensor]):
    def __init__(self, capacity_bytes: int):
        super().__init__()
        self.capacity = capacity_bytes
        self.used = 0

    def put(self, key: int, value: torch.Tensor) -> None:
        if key in self._entries:
            return
        self._entries[key] = value
        self.stores += 1
        self.used += value.numel() * value.element_size()
        self._evict(keep=key)

    def _evict(self, keep: int | None = None) -> None:
        """Least recently used first, skipping pinned entries and `keep` (the entry just stored, which a running
        step needs even when it alone is larger than the budget); may stay over budget when nothing else can go."""
        if self.used <= self.capacity:
            return
        for key in [k for k in self._entries if k != keep and not self._pins[k]]:
            old = self._entries.pop(key)
            self.used -= old.numel() * old.element_size()
            if self.used <= self.capacity:
                return

    def _unpinned(self, keys: list[int]) -> None:
        """Entries over the budget are evicted once nothing holds them."""
        self._evict()
