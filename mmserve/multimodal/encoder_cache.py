"""EncoderCache: vision-encoder outputs kept by media hash (LRU, bounded in bytes), so an image is encoded once
even when chunked prefill splits its tokens across steps or another request sends the same image.

Entries can be pinned (counted per hash): a pinned entry is never evicted. The scheduler pins the items of a
prompt being prefilled in chunks until its last chunk has run, and a step pins the items it places while it
encodes the others, so that neither a later chunk nor the same step ever finds its item gone.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mmserve.multimodal.inputs import MultimodalItem


def _as_they_are(items: list[MultimodalItem]) -> list[MultimodalItem]:
    return items


class EncoderCache:
    def __init__(self, capacity_bytes: int):
        # Turns items as requests carry them into the encoder's inputs, for the misses only: the engine's image
        # processor where the API process sent decoded images (EngineImagePrep), else nothing to do
        self.prepare: Callable[[list[MultimodalItem]], list[MultimodalItem]] = _as_they_are
        self.capacity = capacity_bytes
        self.used = 0
        self._entries: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._pins: Counter[int] = Counter()
        self.hits = 0  # lookups served
        self.stores = 0  # encoder outputs stored, i.e. encoder runs per item

    def get(self, key: int) -> torch.Tensor | None:
        value = self._entries.get(key)
        if value is None:
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return value

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

    def pin(self, keys: Iterable[int]) -> None:
        self._pins.update(keys)

    def unpin(self, keys: Iterable[int]) -> None:
        """Undo one `pin` of each key; entries over the budget are evicted once nothing holds them."""
        self._pins.subtract(keys)
        self._pins = +self._pins  # drop the counts that reached zero
        self._evict()

    def pinned(self, key: int) -> bool:
        return self._pins[key] > 0

    def pin_count(self) -> int:
        """Pins held, over all keys (0 once every step and chunked prompt let go)."""
        return sum(self._pins.values())

    def __contains__(self, key: int) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)
