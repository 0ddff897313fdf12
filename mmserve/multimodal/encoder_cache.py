"""EncoderCache: vision-encoder outputs kept by media hash (LRU, bounded in bytes), so an image is encoded once
even when chunked prefill splits its tokens across steps or another request sends the same image."""

from __future__ import annotations

from collections import OrderedDict

import torch


class EncoderCache:
    def __init__(self, capacity_bytes: int):
        self.capacity = capacity_bytes
        self.used = 0
        self._entries: OrderedDict[int, torch.Tensor] = OrderedDict()
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
        size = value.numel() * value.element_size()
        self._entries[key] = value
        self.stores += 1
        self.used += size
        # An entry larger than the whole budget still stays until the next insertion: the step that needs it
        # is running now.
        while self.used > self.capacity and len(self._entries) > 1:
            _, old = self._entries.popitem(last=False)
            self.used -= old.numel() * old.element_size()

    def __contains__(self, key: int) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)
