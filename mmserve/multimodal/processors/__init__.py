"""Per-family processor specs: Hugging Face architecture name -> what the API process needs to cut a family's
processor output into a request's MultimodalInputs.

The API process turns media into token ids and items without the model's weights or its code: it reads the spec of
the checkpoint's architecture, never the model class (importing a model pulls in its layers, attention backends and
kernels). Each module here is one family's processor side and lists its architectures in `PROCESSORS`, under the
names `mmserve.models.registry` uses; a model file may import helpers from here (a token count its forward also
needs), never the reverse. A model that takes media is one whose architecture has a spec here: code outside the
package adds its own with `ProcessorRegistry.register`, next to `ModelRegistry.register`.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mmserve.multimodal.inputs import MultimodalInputs


@dataclass(frozen=True)
class ProcessorSpec:
    # (hf_config, the HF processor's output for one prompt, its ids as input_ids [1, len]) -> the prompt's items
    # (and M-RoPE positions where the family has them); a ValueError is the request's 400
    multimodal_inputs: Callable[[Any, dict[str, Any]], MultimodalInputs]
    # The processor writes text around each placeholder that transformers tokenises together with the prompt's own
    # text, so placeholders are expanded in the text before tokenising (MultimodalProcessor._expand_in_text)
    expand_placeholders_in_text: bool = False
    # (HF processor, --chat-template) -> the text the HF processor puts before every prompt it tokenises; raises
    # where mmserve cannot match that at startup
    text_prefix: Callable[[Any, str | None], str] | None = None
    # (HF image processor, image height, width, (min, max) pixels) -> the (t, h, w) patch grid it makes of such an
    # image. A family that has it may have its images prepared in the engine (--mm-image-prep): the API process
    # expands the placeholder from the grid alone and sends the decoded image; the engine runs the image processor.
    image_grid: Callable[[Any, int, int, tuple[int, int]], tuple[int, int, int]] | None = None
    # Each placeholder stays its one token (cross-attention models: the media never enter the token stream), whatever
    # text the HF processor writes around an item processed alone (Mllama's BOS after a leading image)
    keeps_placeholder: bool = False
    # (HF processor, hf_config, a video's ProcessedMedia, its own sound track's) -> one ProcessedMedia of the video
    # with its sound interleaved by time (mm_processor_kwargs use_audio_in_video: the family's kwargs table offers it)
    video_with_audio: Callable[[Any, Any, Any, Any], Any] | None = None


class _ProcessorRegistry:
    def __init__(self) -> None:
        self._specs: dict[str, ProcessorSpec] = {}
        self._builtins_loaded = False

    def _load_builtins(self) -> None:
        if self._builtins_loaded:
            return
        self._builtins_loaded = True
        for info in pkgutil.iter_modules(__path__):
            module = importlib.import_module(f"{__name__}.{info.name}")
            for architecture, spec in getattr(module, "PROCESSORS", {}).items():
                self._specs.setdefault(architecture, spec)

    def register(self, architecture: str, spec: ProcessorSpec) -> None:
        """Serve media for checkpoints whose config lists `architecture` with `spec` (replacing a built-in)."""
        self._load_builtins()
        self._specs[architecture] = spec

    def supported(self) -> list[str]:
        self._load_builtins()
        return sorted(self._specs)

    def resolve(self, architectures: list[str]) -> ProcessorSpec | None:
        """The spec of the first of `architectures` that has one; None for a model that takes text only (or an
        architecture nobody registered: the model registry refuses that one at startup)."""
        self._load_builtins()
        for arch in architectures:
            if arch in self._specs:
                return self._specs[arch]
        return None


ProcessorRegistry = _ProcessorRegistry()
