"""MultimodalItem and MultimodalInputs: what a request carries besides token ids.

An item is one image or one video (or, for Qwen3-VL, one video frame): its processor features (pixel values, grid),
where its placeholder tokens sit in input_ids, and a hash of what the encoder will make of it. Those placeholder
positions hold a pad value derived from the hash and kept outside the vocabulary, so the radix cache shares a prefix
only between requests with the same media prepared the same way.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mmserve.messages import WireMultimodal, WireTensor

# Pad values live above the vocabulary in a 2**40-wide band: far from any real vocabulary size and far from
# int64 overflow, with a negligible chance that two different media collide.
_PAD_BASE = 1 << 40
_PAD_RANGE = 1 << 40


def content_hash(*tensors: torch.Tensor) -> int:
    """A 64-bit hash of tensors' bytes, shapes and dtypes: an item's hash when its producer set none (the processor
    output identifies the media)."""
    h = hashlib.blake2b(digest_size=8)
    for t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return _nonzero(int.from_bytes(h.digest(), "little"))


def media_item_hash(media_key: bytes, part: int) -> int:
    """The hash of the item that starts `part` tokens into the expansion of a media item whose identity is
    `media_key` (its content digest and the settings it was prepared with; see MultimodalProcessor). One image or
    video may become several items (Qwen3-VL: one per frame), each its own encoder output."""
    h = hashlib.blake2b(media_key, digest_size=8)
    h.update(part.to_bytes(8, "little"))
    return _nonzero(int.from_bytes(h.digest(), "little"))


def _nonzero(value: int) -> int:
    return value or 1  # 0 means "not hashed yet" in MultimodalItem


def pad_value(item_hash: int) -> int:
    return _PAD_BASE + item_hash % _PAD_RANGE


def is_pad(token_ids: torch.Tensor) -> torch.Tensor:
    return token_ids >= _PAD_BASE


@dataclass
class MultimodalItem:
    modality: str  # "image" or "video"
    features: dict[str, torch.Tensor]  # this item's slice of the processor output, e.g. pixel_values, grid_thw
    offset: int  # first placeholder position in input_ids
    length: int  # number of placeholder tokens (= rows of the encoder output)
    # The encoder cache's key and the source of the pad value. The processor sets it from the media's content and
    # the settings it was prepared with (media_item_hash), without reading the features; 0 until set, and then
    # `ensure_hash` hashes the features.
    hash: int = 0

    def ensure_hash(self) -> int:
        if not self.hash:
            self.hash = content_hash(*(self.features[k] for k in sorted(self.features)))
        return self.hash

    @property
    def pad_value(self) -> int:
        return pad_value(self.ensure_hash())

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass
class MultimodalInputs:
    items: list[MultimodalItem] = field(default_factory=list)
    # Models with 3-D rotary positions (Qwen2-VL family): [3, prompt_len] for the prompt, and the offset that
    # turns a later token index into its position (index + mrope_delta in all three rows).
    mrope_positions: torch.Tensor | None = None
    mrope_delta: int = 0

    def padded_ids(self, input_ids: list[int]) -> list[int]:
        """input_ids with each item's placeholder tokens replaced by the item's pad value."""
        ids = list(input_ids)
        for item in self.items:
            ids[item.offset : item.end] = [item.pad_value] * item.length
        return ids

    def positions(self, start: int, end: int) -> torch.Tensor:
        """[3, end - start] rotary positions of tokens start..end-1 (prompt or generated)."""
        assert self.mrope_positions is not None
        prompt_len = self.mrope_positions.shape[1]
        head = self.mrope_positions[:, start:min(end, prompt_len)]
        if end <= prompt_len:
            return head
        tail = torch.arange(max(start, prompt_len), end) + self.mrope_delta
        return torch.cat([head, tail.expand(3, -1)], dim=1)


# ----- wire format: raw bytes with dtype and shape, no pickle (see mmserve.messages) -----

def fixed_size_image_items(ids: torch.Tensor, image_token_id: int, pixels: torch.Tensor,
                           per_image: int) -> MultimodalInputs:
    """One item per row of `pixels` for processors that expand every image to the same `per_image` placeholder
    tokens (LLaVA 1.5, Gemma 3): adjacent images make one run of placeholders, cut in order."""
    positions = (ids == image_token_id).nonzero().flatten().tolist()
    if len(positions) != per_image * len(pixels):
        raise ValueError(f"the prompt has {len(positions)} image placeholder tokens for {len(pixels)} images of "
                         f"{per_image} tokens each")
    items = []
    for index in range(len(pixels)):
        start = positions[index * per_image]
        assert positions[(index + 1) * per_image - 1] == start + per_image - 1, "an image's tokens are contiguous"
        items.append(MultimodalItem("image", {"pixel_values": pixels[index:index + 1]}, start, per_image))
    return MultimodalInputs(items=items)


def tensor_to_wire(t: torch.Tensor) -> WireTensor:
    from mmserve.messages import WireTensor

    t = t.detach().contiguous().cpu()
    return WireTensor(str(t.dtype).removeprefix("torch."), list(t.shape), t.view(torch.uint8).numpy().tobytes()
                      if t.numel() else b"")


def tensor_from_wire(w: WireTensor, device: torch.device | str = "cpu") -> torch.Tensor:
    dtype = getattr(torch, w.dtype)
    flat = torch.frombuffer(bytearray(w.data), dtype=torch.uint8) if w.data else torch.empty(0, dtype=torch.uint8)
    return flat.view(dtype).reshape(w.shape).to(device)


def to_wire(mm: MultimodalInputs) -> WireMultimodal:
    from mmserve.messages import WireItem, WireMultimodal

    return WireMultimodal(
        items=[WireItem(it.modality, {k: tensor_to_wire(v) for k, v in it.features.items()}, it.offset, it.length,
                        it.ensure_hash()) for it in mm.items],
        mrope_positions=None if mm.mrope_positions is None else tensor_to_wire(mm.mrope_positions),
        mrope_delta=mm.mrope_delta,
    )


def from_wire(w: WireMultimodal, device: torch.device | str = "cpu") -> MultimodalInputs:
    items = [MultimodalItem(it.modality, {k: tensor_from_wire(v, device) for k, v in it.features.items()}, it.offset,
                            it.length, it.hash) for it in w.items]
    positions = None if w.mrope_positions is None else tensor_from_wire(w.mrope_positions)
    return MultimodalInputs(items=items, mrope_positions=positions, mrope_delta=w.mrope_delta)
