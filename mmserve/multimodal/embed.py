"""embed_multimodal: text embeddings with encoder outputs scattered in at the media placeholder positions.

Each model calls it with its own `encode(items) -> list of [length, hidden] tensors`. Only the items that
overlap this step's tokens are needed; an item already encoded (an earlier chunk, or another request with the
same media) comes from the EncoderCache and is sliced, never recomputed.

`embed_tokens` is any callable ids -> [tokens, width] whose width matches the encoder outputs: a model whose
encoder rows carry extra columns for later layers (Qwen3-VL's DeepStack features) passes one that pads text
embeddings with zeros, and gets those columns sliced and placed with the rest.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mmserve.distributed.parallel_state import dp_encoder, encode_data_parallel
from mmserve.forward_batch import ForwardBatch, ForwardMode
from mmserve.multimodal.encoder_cache import EncoderCache
from mmserve.multimodal.inputs import MultimodalItem, is_pad


def embed_multimodal(input_ids: torch.Tensor, batch: ForwardBatch,
                     embed_tokens: Callable[[torch.Tensor], torch.Tensor],
                     encode: Callable[[list[MultimodalItem]], list[torch.Tensor]],
                     cache: EncoderCache) -> torch.Tensor:
    if batch.mode != ForwardMode.EXTEND or not batch.mm_inputs or not any(batch.mm_inputs):
        return embed_tokens(input_ids)
    embeds = embed_tokens(input_ids.masked_fill(is_pad(input_ids), 0))
    # (item, rows in this step's flattened tokens, rows of the item's encoder output)
    placements: list[tuple[MultimodalItem, slice, slice]] = []
    offset = 0
    for mm, n, start in zip(batch.mm_inputs, batch.extend_lens_cpu, batch.prefix_lens_cpu, strict=True):
        for item in (mm.items if mm else []):
            lo, hi = max(item.offset, start), min(item.end, start + n)
            if lo < hi:
                placements.append((item, slice(offset + lo - start, offset + hi - start),
                                   slice(lo - item.offset, hi - item.offset)))
        offset += n
    # every item this step places stays in the cache while the others are stored (they may exceed its budget)
    needed = [item.hash for item, _, _ in placements]
    cache.pin(needed)
    try:
        missing = list({item.hash: item for item, _, _ in placements if item.hash not in cache}.values())
        if missing:
            if dp_encoder():  # each rank encodes its share; the outputs are gathered
                outs = encode_data_parallel(lambda share: encode(cache.prepare([missing[i] for i in share])),
                                            [item.length for item in missing], embeds.shape[-1], embeds.dtype,
                                            embeds.device)
            else:
                outs = encode(cache.prepare(missing))
            for item, out in zip(missing, outs, strict=True):
                assert out.shape[0] == item.length, f"encoder gave {out.shape[0]} rows for {item.length} placeholders"
                cache.put(item.hash, out)
        for item, rows, part in placements:
            embeds[rows] = cache.get(item.hash)[part].to(embeds.dtype)
    finally:
        cache.unpin(needed)
    return embeds
