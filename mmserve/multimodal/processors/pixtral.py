"""How images with a Pixtral tower sit in a prompt (LLaVA with a Pixtral tower, and Mistral 3): an image of
`rows x cols` tokens is `[IMG]` x cols then `[IMG_BREAK]` for each row, the last `[IMG_BREAK]` being `[IMG_END]`.
An item covers that whole span (`models/pixtral.py` says why). Registers no architecture of its own.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PretrainedConfig

from mmserve.multimodal.inputs import MultimodalInputs, MultimodalItem


def image_span(rows: int, cols: int) -> int:
    """Positions of an image of rows x cols tokens: each row closed by [IMG_BREAK] (the last by [IMG_END])."""
    return rows * (cols + 1)


def pixtral_image_inputs(hf_config: PretrainedConfig, processed: dict[str, Any], unit: int) -> MultimodalInputs:
    """One item per image, covering its whole span ([IMG] rows with their [IMG_BREAK]s and the [IMG_END]); `unit`
    is the pixels per token side (patch x spatial merge). Its features: the pixels, the (height, width) the
    processor resized it to, and the ids of the break and end tokens, read from the span (the model's config does
    not name them)."""
    ids = processed["input_ids"][0]
    if processed.get("pixel_values") is None:
        return MultimodalInputs(items=[])
    pixels = processed["pixel_values"]
    pixels = [p for part in (pixels if isinstance(pixels, list) else [pixels]) for p in part]
    image_id = hf_config.image_token_id
    items, at = [], 0
    for px, (height, width) in zip(pixels, processed["image_sizes"].tolist(), strict=True):
        rows, cols = height // unit, width // unit
        found = (ids[at:] == image_id).nonzero()
        if not len(found):
            raise ValueError("the prompt has fewer image spans than images")
        start = at + int(found[0])
        length = image_span(rows, cols)
        span = ids[start:start + length]
        grid = span.view(rows, cols + 1) if len(span) == length else None
        if grid is None or not bool((grid[:, :cols] == image_id).all()) or bool((grid[:, cols] == image_id).any()):
            raise ValueError(f"an image of {rows}x{cols} tokens does not fill its placeholder span at {start}")
        # (break, end): a one-row image has no break; its end stands in, and is overwritten as the last row
        features = {"pixel_values": px[None], "image_sizes": torch.tensor([[height, width]]),
                    "row_end_ids": torch.stack([grid[0, cols], grid[-1, cols]])}
        items.append(MultimodalItem("image", features, start, length))
        at = start + length
    if bool((ids[at:] == image_id).any()):
        raise ValueError("the prompt has more image placeholder tokens than its images fill")
    return MultimodalInputs(items=items)
