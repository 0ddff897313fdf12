"""CrossKVCache: the K and V that cross-attention layers read (Llama 3.2 Vision's image states), kept per media item
in preallocated slabs, so that a decode step reads them through a table of slots and can be captured in a CUDA
graph.

An item's rows (`[cross layers, rows, kv_heads, head_dim]` of K and of V) take `rows` slots of the slab, anywhere
(a free list of slots, like the paged KV pool's); entries are found by the item's hash and evicted least recently
used first. It answers the scheduler as the encoder cache does (`in`, `pin`, `unpin`): a pinned entry is never
evicted, and a running request pins its items until it leaves, so the slots its decode table points at stay its own.

When pinned entries fill the slab, an item that does not fit is kept as plain tensors outside it (`overflow`,
dropped once nothing pins it): the request still runs, eagerly (its rows have no slots for a table to point at).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmserve.cache.pinned import PinnedCache


@dataclass
class CrossEntry:
    rows: int
    slots: torch.Tensor | None  # [rows] int64 on the slab's device; None for an overflow entry
    overflow: tuple[torch.Tensor, torch.Tensor] | None = None  # K, V [layers, rows, kv_heads, head_dim]


class CrossKVCache(PinnedCache[CrossEntry]):
    def __init__(self, rows: int, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str):
        if rows < 1:
            raise ValueError(f"the cross-attention K/V slab needs at least one row, got {rows}")
        super().__init__()
        self.rows = rows
        self.k = torch.zeros(layers, rows, kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self._free = torch.arange(rows, dtype=torch.int64)  # host; handed out from the front

    @staticmethod
    def bytes_per_row(layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * layers * kv_heads * head_dim * dtype.itemsize

    @property
    def free_rows(self) -> int:
        return self._free.numel()

    def available_rows(self) -> int:
        """Rows free now or once the unpinned entries are evicted."""
        unpinned = (e.rows for k, e in self._entries.items() if e.slots is not None and not self._pins[k])
        return self.free_rows + sum(unpinned)

    def put(self, key: int, k: torch.Tensor, v: torch.Tensor) -> CrossEntry:
        """Store an item's K and V ([layers, rows, kv_heads, head_dim]) in free slots, evicting unpinned entries
        as needed; kept as an overflow entry when the pinned ones leave too little room."""
        if key in self._entries:
            return self._entries[key]
        rows = k.shape[1]
        self._make_room(rows)
        if rows <= self.free_rows:
            slots_host, self._free = self._free[:rows], self._free[rows:]
            slots = slots_host.to(self.k.device)
            self.k[:, slots] = k.to(self.k.dtype)
            self.v[:, slots] = v.to(self.v.dtype)
            entry = CrossEntry(rows, slots)
        else:
            entry = CrossEntry(rows, None, (k.to(self.k.dtype), v.to(self.v.dtype)))
        self._entries[key] = entry
        self.stores += 1
        return entry

    def key_values(self, entry: CrossEntry) -> tuple[torch.Tensor, torch.Tensor]:
        """An entry's K and V, [layers, rows, kv_heads, head_dim] each (gathered from the slab: a copy)."""
        if entry.overflow is not None:
            return entry.overflow
        return self.k[:, entry.slots], self.v[:, entry.slots]

    def _make_room(self, rows: int) -> None:
        for key in [k for k in self._entries if not self._pins[k]]:
            if self.free_rows >= rows:
                return
            self._drop(key)

    def _drop(self, key: int) -> None:
        entry = self._entries.pop(key)
        if entry.slots is not None:
            self._free = torch.cat([self._free, entry.slots.cpu()])

    def _unpinned(self, keys: list[int]) -> None:
        """An overflow entry nothing pins any more is dropped: it is outside the slabs' budget."""
        for key in keys:
            entry = self._entries.get(key)
            if entry is not None and entry.overflow is not None and not self._pins[key]:
                self._drop(key)
