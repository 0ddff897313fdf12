"""What one embedding input is, for `/v1/embeddings` and `Engine.encode`: a text (tokenized as it is), token ids,
or a multimodal item `{"text": ..., "image": ...}` (either key or both).

A vision-language embedder (gme-Qwen2-VL) reads an item as one user turn (the image first, then the text) rendered
by the chat template with its generation prompt, as GME's own encoder writes its prompts (`--chat-template
gme-qwen2-vl`); the pooled token is the template's last. A model with separate towers (CLIP) embeds an item's text
or its image, never both at once (`MultimodalEmbedder.tower_of`).
"""

from __future__ import annotations

from typing import Any

ITEM_KEYS = ("text", "image")


def is_item(value: Any) -> bool:
    return isinstance(value, dict)


def check_item(item: dict[str, Any], where: str) -> None:
    """ValueError, naming `where` (e.g. `input[2]`), unless the item has a non-empty text, an image, or both."""
    unknown = sorted(str(k) for k in item if k not in ITEM_KEYS)
    if unknown:
        raise ValueError(f"{where} has {', '.join(map(repr, unknown))}: an embedding item takes only "
                         f"{' and '.join(ITEM_KEYS)}")
    text, image = item.get("text"), item.get("image")
    if text is not None and not isinstance(text, str):
        raise ValueError(f"{where}.text must be a string, got {type(text).__name__}")
    if not text and image is None:
        raise ValueError(f"{where} has neither text nor an image")


def item_conversation(item: dict[str, Any]) -> list[dict[str, Any]]:
    """The item as one user message, the image before the text (in the `image` part spelling, which carries a
    PIL image or bytes in-process as well as a URL)."""
    parts: list[dict[str, Any]] = []
    if item.get("image") is not None:
        parts.append({"type": "image", "image": item["image"]})
    if item.get("text"):
        parts.append({"type": "text", "text": item["text"]})
    return [{"role": "user", "content": parts}]
