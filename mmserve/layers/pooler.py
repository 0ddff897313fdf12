"""Pooler: how an embedding or score model turns a prompt's final hidden states into one vector.

A request's `span` (the positions whose hidden states count) is fixed when it arrives: the last token (decoder
embedders; score heads take the last token that is not padding, as transformers' sequence classifiers do), the
first (CLS), or all of them (mean). The scheduler computes those positions (the prefix cache may serve only what
comes before the span) and asks the model for their rows, chunk by chunk: `accumulate` folds each chunk's rows into
a running float32 sum, so a prompt prefilled in chunks pools to the same vector as one pass. `finish` divides and,
for embedding models, L2-normalises.

The method comes from a sentence-transformers folder (`modules.json`, its Pooling module's `config.json`, and a
`Normalize` module) when the checkpoint has one, else from the family's convention: last token, normalised, for
decoder embedders; last non-padding token, raw scores, for `*ForSequenceClassification`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

METHODS = ("last", "mean", "cls")


@dataclass(frozen=True)
class Pooler:
    method: str = "last"
    normalize: bool = True
    pad_token_id: int | None = None  # "last": skip trailing padding (score heads, as transformers does)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"pooling method must be one of {', '.join(METHODS)}, got {self.method!r}")

    def span(self, input_ids: list[int]) -> range:
        """The positions of the prompt whose hidden states the result pools."""
        if self.method == "mean":
            return range(len(input_ids))
        if self.method == "cls":
            return range(1)
        last = len(input_ids) - 1
        if self.pad_token_id is not None:  # the rightmost non-padding token; the first when all are padding
            while last > 0 and input_ids[last] == self.pad_token_id:
                last -= 1
        return range(last, last + 1)

    @staticmethod
    def accumulate(total: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
        """`total` plus the sum of one step's rows [R, H] (float32); unchanged when the step had none."""
        if rows.shape[0] == 0:
            return total
        part = rows.float().sum(dim=0)
        return part if total is None else total + part

    def finish(self, total: torch.Tensor, count: int) -> torch.Tensor:
        pooled = total / count if self.method == "mean" else total
        return F.normalize(pooled, dim=-1) if self.normalize else pooled

    @classmethod
    def for_model(cls, folder: Path | None, hf_config: Any, architectures: list[str]) -> Pooler:
        """The checkpoint's pooling: its sentence-transformers configuration if it has one, else the family's."""
        if any(arch.endswith("ForSequenceClassification") for arch in architectures):
            text = getattr(hf_config, "text_config", None) or hf_config
            return cls("last", normalize=False, pad_token_id=getattr(text, "pad_token_id", None))
        found = _sentence_transformers_pooling(folder) if folder is not None else None
        return found if found is not None else cls("last", normalize=True)


def shorten(vector: list[float], dimensions: int) -> list[float]:
    """The first `dimensions` values, L2-normalised again (Matryoshka embeddings; OpenAI's `dimensions`)."""
    if isinstance(dimensions, bool) or not isinstance(dimensions, int) or not 1 <= dimensions <= len(vector):
        raise ValueError(f"dimensions must be an integer in [1, {len(vector)}] (the model's size), got {dimensions!r}")
    head = vector[:dimensions]
    norm = sum(x * x for x in head) ** 0.5
    return [x / norm for x in head] if norm > 0 else head


def _sentence_transformers_pooling(folder: Path) -> Pooler | None:
    """The Pooling and Normalize modules of a sentence-transformers folder (`modules.json`); None without one."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return None
    modules = json.loads(modules_file.read_text())
    pooling = next((m for m in modules if m.get("type", "").endswith("Pooling")), None)
    normalize = any(m.get("type", "").endswith("Normalize") for m in modules)
    if pooling is None:
        return Pooler("last", normalize=normalize)
    config = json.loads((folder / pooling.get("path", "") / "config.json").read_text())
    modes = {"pooling_mode_lasttoken": "last", "pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
    chosen = [method for key, method in modes.items() if config.get(key)]
    if len(chosen) != 1:
        raise ValueError(f"{folder / pooling.get('path', '')}/config.json asks for {len(chosen)} pooling modes "
                         f"({', '.join(k for k in config if k.startswith('pooling_mode') and config[k]) or 'none'}); "
                         "mmserve serves one of lasttoken, mean_tokens, cls_token")
    return Pooler(chosen[0], normalize=normalize)
