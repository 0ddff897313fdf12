"""ProcessorCache: the model processor's output for one image or video, kept by a key of its content and the settings
it was prepared with (LRU, bounded in bytes, thread-safe), so a repeated image skips decoding and the processor. The
API process's counterpart of the engine's EncoderCache.

Entries are private: `put` stores a copy and `get` hands out a copy, so no request can change what another one reads.
A copy costs a memcpy, a small part of the decoding and resizing it saves."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ProcessedMedia:
    """The processor's output for one image or video, processed alone: its features (every tensor's first dimension
    runs over patches, grids or time steps, so a request's items concatenate along it, as one processor call over all
    of them gives them) and the token ids its placeholder expands to."""

    features: dict[str, torch.Tensor]
    token_ids: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.features.values()) + 8 * len(self.token_ids)

    def copy(self) -> ProcessedMedia:
        return ProcessedMedia({name: t.clone() for name, t in self.features.items()}, self.token_ids)


class ProcessorCache:
    def __init__(self, capacity_bytes: int):
        self.capacity = capacity_bytes
        self.used = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[bytes, ProcessedMedia] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: bytes) -> ProcessedMedia | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
        return entry.copy()  # outside the lock: nobody writes to a stored entry, eviction only drops it

    def put(self, key: bytes, value: ProcessedMedia) -> None:
        size = value.nbytes
        if size > self.capacity:  # also every entry when the cache is off (capacity 0)
            return
        entry = value.copy()
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = entry
            self.used += size
            while self.used > self.capacity:
                _, old = self._entries.popitem(last=False)
                self.used -= old.nbytes

    def __len__(self) -> int:
        return len(self._entries)
