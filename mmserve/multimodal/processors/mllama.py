"""Llama 3.2 Vision (Mllama): an image is one `<|image|>` token in the text and never enters the token stream; the
decoder's cross-attention layers read it instead (`models/mllama.py`).

Each image is one item of length 1 (its token, which carries the item's pad value like any placeholder) with its
tiles as the processor made them: `pixel_values` [max_tiles, C, H, W] (padded with zero tiles),
`aspect_ratio_ids` [1] and `aspect_ratio_mask` [max_tiles]. The processor's `cross_attention_mask` is not sent: it
follows from where the image tokens stand and how many tiles each image has (`cross_attention_spans`), which the
model derives per request, for generated tokens as well.

The text before the first image is an item too ("text", its token ids as its feature): transformers lets those
tokens attend to all of the prompt's images alike, so their KV depends on every image, and the prefix cache must
not share it with a request that has other images or none. As an item its positions carry a pad value hashed from
the text and all the prompt's media (`MultimodalProcessor._assemble`); the model embeds the ids it carries.
"""

from __future__ import annotations

import sys
from typing import Any

from transformers import PretrainedConfig

from mmserve.multimodal.inputs import MultimodalInputs, MultimodalItem
from mmserve.multimodal.processors import ProcessorSpec

# the end of the last images' spans: the prompt's end in transformers' processor, where generation repeats the last
# prompt row's mask for every new token, i.e. the spans simply never end
OPEN_END = sys.maxsize


def cross_attention_spans(locations: list[int]) -> list[tuple[int, int]]:
    """[start, end) token indices that attend to each image, from its token's index: an image is seen from its token
    up to the next image's token, and a run of adjacent image tokens is seen together up to the end of the next
    span after the run; the last images' spans never end. Tokens before the first image see none."""
    ends = [*locations[1:], OPEN_END]
    for i in range(len(locations) - 2, -1, -1):
        if ends[i] == locations[i] + 1:  # adjacent to the next image: shares its end
            ends[i] = ends[i + 1]
    return list(zip(locations, ends, strict=True))


def mllama_inputs(hf_config: PretrainedConfig, processed: dict[str, Any]) -> MultimodalInputs:
    """One item per `<|image|>` token, in the order of the images."""
    pixels = processed.get("pixel_values")
    if pixels is None:
        return MultimodalInputs(items=[])
    ids = processed["input_ids"][0]
    tiles, *shape = pixels.shape[-4:]
    pixels = pixels.reshape(-1, tiles, *shape)  # [images, tiles, C, H, W]: one prompt's images, or items' joined
    ratio_ids = processed["aspect_ratio_ids"].reshape(-1)
    ratio_mask = processed["aspect_ratio_mask"].reshape(-1, tiles)
    locations = (ids == hf_config.image_token_index).nonzero().flatten().tolist()
    if len(locations) != len(pixels):
        raise ValueError(f"the prompt has {len(locations)} <|image|> tokens for {len(pixels)} images")
    items = [MultimodalItem("image", {"pixel_values": pixels[i], "aspect_ratio_ids": ratio_ids[i:i + 1],
                                      "aspect_ratio_mask": ratio_mask[i]}, location, 1)
             for i, location in enumerate(locations)]
    if locations[0] > 0:  # the text before the first image, which attends to all of the prompt's images
        items.insert(0, MultimodalItem("text", {"input_ids": ids[:locations[0]].clone()}, 0, locations[0]))
    return MultimodalInputs(items=items)


PROCESSORS = {
    # the processor writes a BOS after a prompt's leading image tokens when the prompt has none: an image processed
    # alone comes back as "<|image|><|begin_of_text|>", of which only the image's own token is its expansion
    "MllamaForConditionalGeneration": ProcessorSpec(mllama_inputs, keeps_placeholder=True),
}
