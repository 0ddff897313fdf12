"""EngineImagePrep: the model's torchvision image processor run in the engine, on the engine's device, for the images
the API process sent decoded (--mm-image-prep engine).

Normalising an image and cutting it into patches is most of what a processor costs on the CPU (7-8 ms for a 448x448
image, 20-24 ms at 896x672 on the H100 host, with the resize), and its float32 output is four times the image's
bytes (eight for Qwen-VL, whose patches repeat each frame twice in time) to serialise and ship. The API process
resizes (uint8, on the CPU: a GPU's resize rounds some pixels differently from the reference's) and plans each
image's grid and placeholder expansion (`ProcessorSpec.image_grid`); here the same transformers processor, told not
to resize, does the rest on the GPU, once per step for every image the step encodes, and the grid it makes is
checked against the one the prompt was expanded for.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from mmserve.multimodal.inputs import MultimodalItem


class EngineImagePrep:
    def __init__(self, folder: Path, trust_remote_code: bool, device: torch.device):
        from transformers import AutoImageProcessor

        self.processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)
        self.device = device

    def __call__(self, items: list[MultimodalItem]) -> list[MultimodalItem]:
        """`items` with every decoded image replaced by its processor features (pixel_values on this device, the
        grid on the host); other items as they are."""
        todo = [i for i, item in enumerate(items) if "image_uint8" in item.features]
        if not todo:
            return items
        images = [items[i].features["image_uint8"][0].to(self.device) for i in todo]
        # resized already, in the API process (on the CPU, as the reference is)
        out = self.processor(images=images, do_resize=False, return_tensors="pt")
        grids = out["image_grid_thw"].cpu()
        ready = list(items)
        for i, pixels, grid in zip(todo, out["pixel_values"].split(grids.prod(-1).tolist()), grids, strict=True):
            planned = items[i].features["grid_thw"]
            # the API process checked its plan against this processor at startup
            assert grid.tolist() == planned[0].tolist(), f"grid {grid.tolist()}, planned {planned[0].tolist()}"
            ready[i] = dataclasses.replace(items[i], features={"pixel_values": pixels, "grid_thw": planned})
        return ready
