"""ModelRegistry: Hugging Face architecture name -> model class.

Built-in families are the modules of `mmserve.models` that define `EntryClass`; they are imported the
first time a lookup needs them. Code outside the package adds its own with `ModelRegistry.register`. Whether a
model takes media is its architecture's entry in `mmserve.multimodal.processors.ProcessorRegistry` (the processor
side, which the API process uses without importing model code), registered there under the same name.
"""

from __future__ import annotations

import importlib
import pkgutil

from torch import nn


class _ModelRegistry:
    def __init__(self) -> None:
        self._models: dict[str, type[nn.Module]] = {}
        self._builtins_loaded = False

    def _load_builtins(self) -> None:
        if self._builtins_loaded:
            return
        self._builtins_loaded = True
        import mmserve.models as package

        for info in pkgutil.iter_modules(package.__path__):
            if info.name in ("registry", "loader"):
                continue
            module = importlib.import_module(f"mmserve.models.{info.name}")
            for cls in getattr(module, "EntryClass", []):
                self._models.setdefault(cls.__name__, cls)

    def register(self, architecture: str, cls: type[nn.Module]) -> None:
        """Serve checkpoints whose config lists `architecture` with `cls` (replacing a built-in of that name)."""
        self._load_builtins()
        self._models[architecture] = cls

    def supported(self) -> list[str]:
        self._load_builtins()
        return sorted(self._models)

    def resolve(self, architectures: list[str]) -> type[nn.Module]:
        self._load_builtins()
        for arch in architectures:
            if arch in self._models:
                return self._models[arch]
        raise ValueError(
            f"unsupported model architecture {architectures}; supported: {', '.join(self.supported())}. "
            "Register your own with mmserve.ModelRegistry.register(name, cls)."
        )


ModelRegistry = _ModelRegistry()
