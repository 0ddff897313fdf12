"""TowerInputs: the requests of a two-tower embedder (CLIP), where a text and an image are embedded apart, never
in one prompt.

A text is its tokenizer's ids (CLIP's ends each with end-of-text, the token its text tower pools). An image is a
request of one placeholder token (id 0, replaced by the item's pad value) whose item carries the image
processor's pixels; the model's image tower answers for that token (`models/clip_embedding.py`). Images are loaded
under the server's media policy, as every other image is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmserve.config import ServerArgs
from mmserve.multimodal.inputs import MultimodalInputs, MultimodalItem
from mmserve.multimodal.media import MediaPolicy, load_image

# architectures served with TowerInputs (by name: the API process decides without importing model code)
TWO_TOWER_ARCHITECTURES = frozenset({"CLIPModel"})


class TowerInputs:
    def __init__(self, args: ServerArgs, folder: Path):
        from transformers import AutoImageProcessor

        self.image_processor = AutoImageProcessor.from_pretrained(folder)
        self.policy = MediaPolicy(allowed_local_media_path=args.allowed_local_media_path,
                                  allow_private_urls=args.allow_private_media_urls,
                                  fetch_timeout_s=args.media_fetch_timeout)

    def image(self, source: Any, label: str = "image") -> tuple[list[int], MultimodalInputs]:
        """One image (a URL, allowed path, bytes or PIL image) as a one-token request; a bad image is a
        MediaError (a ValueError) naming `label`."""
        image = load_image(source, self.policy, label)
        pixels = self.image_processor(images=[image], return_tensors="pt")["pixel_values"]
        # hashed from its pixels (MultimodalItem.ensure_hash): the same picture is the same request
        item = MultimodalItem("image", {"pixel_values": pixels}, offset=0, length=1)
        return [0], MultimodalInputs(items=[item])
