"""Memory pools for the KV cache: request slots (`ReqToTokenPool`) and per-token KV slots (`KVPool`).

`ReqToTokenPool` owns one row per running request; the row lists, position by position, the KV slot that
holds that token's keys and values. `KVPool` owns the K/V tensors themselves (one pair per layer, page size
one token) and the free list of slots. Neither pool knows about prefix sharing: the radix cache and the
scheduler decide who frees what.
"""

from __future__ import annotations

import torch


class ReqToTokenPool:
    """Maps a request slot to the KV-cache slot of each of its tokens."""

    def __init__(self, size: int, max_context_len: int, device: torch.device | str) -> None:
        if size <= 0 or max_context_len <= 0:
            raise ValueError(f"size and max_context_len must be positive, got {size}, {max_context_len}")
        self.size: int = size
        self.max_context_len: int = max_context_len
        self.device: torch.device = torch.device(device)
        # One row more than `size`, never handed out and left all zeros: every position of it maps to the KV
        # pool's dummy slot 0, for padding requests (the prefill CUDA graphs' padding tokens attend through it).
        self.req_to_token: torch.Tensor = torch.zeros(
            (size + 1, max_context_len), dtype=torch.int64, device=self.device
        )
        self.padding_row: int = size
        # Requests come and go one at a time, so a Python list is cheap here; reversed so that row 0 is
        # handed out first, which keeps debugging output readable.
        self._free_rows: list[int] = list(range(size - 1, -1, -1))

    def alloc(self) -> int | None:
        """A free row index, or None when every row is taken."""
        if not self._free_rows:
            return None
        return self._free_rows.pop()

    def free(self, idx: int) -> None:
        if not 0 <= idx < self.size:
            raise ValueError(f"row {idx} out of range [0, {self.size})")
        self._free_rows.append(idx)

    def available_size(self) -> int:
        return len(self._free_rows)

    def clear(self) -> None:
        self._free_rows = list(range(self.size - 1, -1, -1))


class KVPool:
    """Paged KV cache (page size 1): one K and one V tensor per layer indexed by slot.

    Slot 0 is a dummy that is never allocated: padded tokens (e.g. CUDA-graph padding) can write their K/V
    there without touching live data. Real slots are 1..size. The free list is a device tensor so that
    allocation is a slice and freeing is a concatenation, with no per-token Python work.
    """

    def __init__(self, size: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, v_head_dim: int | None = None) -> None:
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        self.size: int = size
        self.num_layers: int = num_layers
        self.num_kv_heads: int = num_kv_heads
        self.head_dim: int = head_dim
        self.v_head_dim: int = head_dim if v_head_dim is None else v_head_dim
        self.dtype: torch.dtype = dtype
        self.device: torch.device = torch.device(device)
        self.k_buffers: list[torch.Tensor] = [
            torch.zeros((size + 1, num_kv_heads, head_dim), dtype=dtype, device=self.device)
            for _ in range(num_layers)
        ]
        self.v_buffers: list[torch.Tensor] = [
            torch.zeros((size + 1, num_kv_heads, self.v_head_dim), dtype=dtype, device=self.device)
            for _ in range(num_layers)
        ]
        self.free_slots: torch.Tensor = self._all_slots()

    def _all_slots(self) -> torch.Tensor:
        return torch.arange(1, self.size + 1, dtype=torch.int64, device=self.device)

    def alloc(self, n: int) -> torch.Tensor | None:
        """`n` free slot ids (int64, on the pool's device), or None if fewer than `n` are free.

        On None nothing is allocated, so the caller can evict and retry.
        """
        if n < 0:
            raise ValueError(f"cannot allocate {n} slots")
        if n > self.free_slots.numel():
            return None
        out = self.free_slots[:n]
        self.free_slots = self.free_slots[n:]
        return out

    def free(self, slots: torch.Tensor) -> None:
        """Return `slots` to the free list; an empty tensor is a no-op."""
        if slots.numel() == 0:
            return
        slots = slots.reshape(-1).to(device=self.device, dtype=torch.int64)
        self.free_slots = torch.cat((self.free_slots, slots))

    def available_size(self) -> int:
        return int(self.free_slots.numel())

    def clear(self) -> None:
        """Mark every slot free (the buffers keep their stale contents; nothing reads a free slot)."""
        self.free_slots = self._all_slots()

    def set_kv(self, layer_id: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v ([n, heads, dim]) into `slots` of layer `layer_id`, cast to the pool dtype."""
        self.k_buffers[layer_id][slots] = k.to(self.dtype)
        self.v_buffers[layer_id][slots] = v.to(self.dtype)

    def get_kv(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole K and V buffers of a layer, [size + 1, heads, dim] each, indexed by slot."""
        return self.k_buffers[layer_id], self.v_buffers[layer_id]

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                        v_head_dim: int | None = None) -> int:
        """Bytes of K and V one token occupies across all layers, to size the pool from a memory budget."""
        v_dim = head_dim if v_head_dim is None else v_head_dim
        return num_layers * num_kv_heads * (head_dim + v_dim) * dtype.itemsize
