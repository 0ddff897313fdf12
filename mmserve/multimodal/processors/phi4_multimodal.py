"""Phi-4-multimodal: one item per image and per audio clip, cut from the HF processor's output.

The image processor resizes an image (keeping its aspect ratio, padding with white) to a grid of `crop_size` crops
and adds a global view of the whole at one crop's size: `image_pixel_values` [crops, 3, crop, crop] with the global
view first, `image_attention_mask` [crops, patches, patches] marking the patches that are not padding, and
`image_sizes` (the resized grid's height and width in pixels). A call with several images pads every image to the
most crops; an item keeps its own. Its tokens are the crops' pooled features without the padding, each row of them
closed by one separator column, one separator, then the global view's rows, each closed alike
(`image_tokens`).

An audio clip is its log-mel frames [frames, mel] (`audio_input_features`, cut to the clip's
`audio_attention_mask` when a call pads several), one placeholder per `time_reduction` frames, rounded up. The model
projects a clip through one pair of maps when the prompt has no image and through another when it has one (as
transformers decides per call), so a clip beside images is another item: its `beside_images` feature says so, and
its hash is set to mark the variant (`MultimodalProcessor._assemble` mixes it into the media's hash, so neither the
encoder cache nor the prefix cache mixes the two).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PretrainedConfig

from mmserve.multimodal.inputs import MultimodalInputs, MultimodalItem
from mmserve.multimodal.processors import ProcessorSpec


def useful_grid(sub_mask: torch.Tensor, grid: tuple[int, int]) -> tuple[int, int]:
    """(rows, columns) of pooled sub-crop features that are not padding: the crops' patch masks [crops, p, p] laid
    out as the `grid` (rows, columns) of crops, every second patch kept (the model pools 2x2 blocks)."""
    rows, cols = grid
    pooled = sub_mask[:, 0::2, 0::2]
    side = pooled.shape[-1]
    laid = pooled.reshape(rows, cols, side, side).transpose(1, 2).reshape(rows * side, cols * side)
    return int(laid[:, 0].sum()), int(laid[0, :].sum())


def crop_grid(image_size: torch.Tensor, crop_size: int) -> tuple[int, int]:
    height, width = (int(v) for v in image_size.reshape(-1)[:2])
    return height // crop_size, width // crop_size


def image_tokens(mask: torch.Tensor, image_size: torch.Tensor, crop_size: int) -> int:
    """Placeholder tokens of one image: each useful row of sub-crop features plus its separator, one separator, and
    the global view's side x (side + 1) rows (side: the pooled features per crop side)."""
    rows, cols = crop_grid(image_size, crop_size)
    useful_h, useful_w = useful_grid(mask[1:1 + rows * cols], (rows, cols))
    side = (mask.shape[-1] + 1) // 2
    return useful_h * (useful_w + 1) + 1 + side * (side + 1)


def _per_item(value: Any) -> list[torch.Tensor]:
    """A processor output of one or several items ([items, ...], or a list of [1, ...] when their shapes differ)
    as one tensor per item."""
    parts = value if isinstance(value, list) else [value]
    return [one for part in parts for one in part.unbind(0)]


def audio_tokens(frames: int, time_reduction: int) -> int:
    return -(-frames // time_reduction)


class _Spans:
    """Consecutive runs of one placeholder token, handed out in order (two items may sit back to back)."""

    def __init__(self, input_ids: torch.Tensor, token_id: int, modality: str):
        self.positions = (input_ids == token_id).nonzero().flatten().tolist()
        self.modality, self.used = modality, 0

    def take(self, length: int) -> int:
        span = self.positions[self.used:self.used + length]
        if len(span) != length or span[-1] - span[0] != length - 1:
            raise ValueError(f"an {self.modality} of {length} tokens has no run of that many placeholders")
        self.used += length
        return span[0]

    def check_all_used(self) -> None:
        if self.used != len(self.positions):
            raise ValueError(f"the prompt has {len(self.positions)} {self.modality} placeholders for {self.used} "
                             f"{self.modality} tokens")


def _image_items(hf_config: PretrainedConfig, processed: dict[str, Any]) -> list[MultimodalItem]:
    pixels = processed.get("image_pixel_values")
    if pixels is None:
        return []
    crop_size = hf_config.vision_config.crop_size
    spans = _Spans(processed["input_ids"][0], hf_config.vision_config.image_token_id, "image")
    items = []
    for pix, mask, size in zip(_per_item(pixels), _per_item(processed["image_attention_mask"]),
                               _per_item(processed["image_sizes"]), strict=True):
        rows, cols = crop_grid(size, crop_size)
        crops = 1 + rows * cols
        length = image_tokens(mask, size, crop_size)
        features = {"image_pixel_values": pix[:crops], "image_attention_mask": mask[:crops],
                    "image_sizes": size.reshape(2)}
        items.append(MultimodalItem("image", features, spans.take(length), length))
    spans.check_all_used()
    return items


def _audio_items(hf_config: PretrainedConfig, processed: dict[str, Any]) -> list[MultimodalItem]:
    features = processed.get("audio_input_features")
    if features is None:
        return []
    ac = hf_config.audio_config
    if ac.downsample_rate != 1:
        raise ValueError(f"Phi-4-multimodal with audio downsample_rate {ac.downsample_rate} is not supported")
    clips = _per_item(features)
    masks = processed.get("audio_attention_mask")
    frames = [int(m.sum()) for m in _per_item(masks)] if masks is not None else [c.shape[0] for c in clips]
    sizes = [int(n) for n in _per_item(processed["audio_embed_sizes"])]
    beside_images = processed.get("image_pixel_values") is not None
    spans = _Spans(processed["input_ids"][0], ac.audio_token_id, "audio")
    items = []
    for clip, n, size in zip(clips, frames, sizes, strict=True):
        length = audio_tokens(n, ac.time_reduction)
        if length != size:
            raise ValueError(f"an audio clip of {n} frames has {size} placeholder tokens, not {length}")
        item = MultimodalItem("audio", {"audio_input_features": clip[:n],
                                        "beside_images": torch.tensor(beside_images)}, spans.take(length), length)
        if beside_images:  # the variant mark (module docstring); a whole hash of the item where nothing mixes it in
            item.ensure_hash()
        items.append(item)
    spans.check_all_used()
    return items


def phi4_multimodal_inputs(hf_config: PretrainedConfig, processed: dict[str, Any]) -> MultimodalInputs:
    items = _image_items(hf_config, processed) + _audio_items(hf_config, processed)
    return MultimodalInputs(items=sorted(items, key=lambda it: it.offset))


PROCESSORS = {"Phi4MultimodalForCausalLM": ProcessorSpec(phi4_multimodal_inputs)}
