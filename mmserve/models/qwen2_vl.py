"""Qwen2-VL: a ViT with 2-D rotary over 14x14 patches (pairs of frames for video), a patch merger that turns each
2x2 block of patches into one LLM token, and the Qwen2 decoder with 3-D (M-RoPE) positions.

The processor side (`Qwen2VLForConditionalGeneration.multimodal_inputs`) cuts the HF processor output into one
MultimodalItem per image/video and computes the prompt's M-RoPE positions.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from mmserve.forward_batch import ForwardBatch
from mmserve.layers.activation import get_act_fn
from mmserve.layers.embedding import ParallelLMHead
from mmserve.layers.linear import default_weight_loader
from mmserve.layers.logits import LogitsProcessor
from mmserve.layers.rotary import rotate_half
from mmserve.models.llama import LlamaForCausalLM, LlamaModel
from mmserve.multimodal.embed import embed_multimodal
from mmserve.multimodal.encoder_cache import EncoderCache
from mmserve.multimodal.inputs import MultimodalInputs, MultimodalItem
from mmserve.multimodal.mrope import mrope_positions

_ENCODER_CACHE_BYTES = 512 << 20


class VisionRotary(nn.Module):
    """2-D rotary of the ViT: half the frequency bands follow the patch row, half the column."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        dim = head_dim // 2
        self.register_buffer("inv_freq", 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)),
                             persistent=False)

    def forward(self, hw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hw: [N, 2] (row, column) of each patch -> cos, sin [N, head_dim] in float32."""
        freqs = (hw[..., None].float() * self.inv_freq).flatten(1)  # [N, 2 * dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def patch_positions(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """[patches, 2] (row, column) of every patch, in the processor's order: merge x merge blocks, row-major."""
    out = []
    for t, h, w in grid_thw.tolist():
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        shape = (h // merge, merge, w // merge, merge)
        rows = rows.reshape(shape).transpose(1, 2).flatten()
        cols = cols.reshape(shape).transpose(1, 2).flatten()
        out.append(torch.stack([rows, cols], dim=-1).repeat(t, 1))
    return torch.cat(out)


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        # rotary in float32, as the reference does
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(x.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(x.dtype)
        outs = []
        for qs, ks, vs in zip(q.split(seqlens), k.split(seqlens), v.split(seqlens), strict=True):
            o = F.scaled_dot_product_attention(qs.transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1))
            outs.append(o.transpose(0, 1))
        return self.proj(torch.cat(outs).reshape(n, -1))


class VisionBlock(nn.Module):
    """Pre-LayerNorm attention and a two-layer MLP, each with a residual. `mlp_names` are the checkpoint's names
    of the MLP's two linears (Qwen2-VL: fc1/fc2; Qwen3-VL: linear_fc1/linear_fc2)."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, act: str, mlp_names: tuple[str, str] = ("fc1", "fc2")):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = VisionAttention(dim, num_heads)
        self.up_name, self.down_name = mlp_names
        self.mlp = nn.ModuleDict({self.up_name: nn.Linear(dim, mlp_dim), self.down_name: nn.Linear(mlp_dim, dim)})
        self.act = get_act_fn(act)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, seqlens)
        return x + self.mlp[self.down_name](self.act(self.mlp[self.up_name](self.norm2(x))))


class PatchMerger(nn.Module):
    """Concatenates each merge x merge block of patch features and projects it to the LLM width."""

    def __init__(self, out_dim: int, dim: int, merge: int):
        super().__init__()
        self.in_dim = dim * merge * merge
        self.ln_q = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.in_dim, self.in_dim), nn.GELU(), nn.Linear(self.in_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.in_dim))


class Qwen2VisionTransformer(nn.Module):
    def __init__(self, vc: PretrainedConfig):
        super().__init__()
        self.merge = vc.spatial_merge_size
        self.patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
        # the reference's Conv3d with stride = kernel is a matmul over each flattened patch
        self.patch_embed = nn.ModuleDict({"proj": nn.Linear(self.patch_dim, vc.embed_dim, bias=False)})
        theta = (getattr(vc, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        self.rotary = VisionRotary(vc.embed_dim // vc.num_heads, theta)
        self.blocks = nn.ModuleList(
            VisionBlock(vc.embed_dim, vc.num_heads, int(vc.embed_dim * vc.mlp_ratio), vc.hidden_act)
            for _ in range(vc.depth))
        self.merger = PatchMerger(vc.hidden_size, vc.embed_dim, self.merge)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed["proj"](pixel_values.to(self.patch_embed["proj"].weight.dtype))
        cos, sin = self.rotary(patch_positions(grid_thw, self.merge).to(x.device))
        # attention runs within each frame (pair) of each item
        seqlens = [h * w for t, h, w in grid_thw.tolist() for _ in range(t)]
        for block in self.blocks:
            x = block(x, cos, sin, seqlens)
        return self.merger(x)


class Qwen2VLForConditionalGeneration(LlamaForCausalLM):
    qkv_bias = True
    uses_mrope = True
    vision_tower: type[nn.Module] = Qwen2VisionTransformer  # Qwen2.5-VL swaps in its windowed ViT

    def __init__(self, config: PretrainedConfig):
        nn.Module.__init__(self)
        self.config = config
        text = config.text_config
        self.visual = self.vision_tower(config.vision_config)
        self.model = LlamaModel(text, qkv_bias=True)
        self._build_head(config, text)

    def _build_head(self, config: PretrainedConfig, text: PretrainedConfig) -> None:
        """LM head (tied to the embedding when either config says so), logits, and the encoder cache; needs
        self.model built first."""
        self.lm_head = ParallelLMHead(text.vocab_size, text.hidden_size)
        self.tied = bool(getattr(text, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False))
        if self.tied:
            self.lm_head.tie_to(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(text.vocab_size)
        self.encoder_cache = EncoderCache(_ENCODER_CACHE_BYTES)

    # ----- forward -----

    def encode(self, items: list[MultimodalItem]) -> list[torch.Tensor]:
        """Vision-tower outputs [placeholder tokens, hidden] for each item, in one batched forward."""
        device = self.visual.patch_embed["proj"].weight.device
        pixels = torch.cat([it.features["pixel_values"] for it in items]).to(device)
        grids = torch.cat([it.features["grid_thw"] for it in items])
        merged = self.visual(pixels, grids)
        return list(merged.split([it.length for it in items]))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        embeds = embed_multimodal(input_ids, batch, self.model.embed_tokens, self.encode, self.encoder_cache)
        hidden_states = self.model(input_ids, positions, batch, input_embeds=embeds)
        return self.logits_processor(hidden_states, self.lm_head, batch)

    # ----- processor side -----

    @classmethod
    def multimodal_inputs(cls, hf_config: PretrainedConfig, processed: dict[str, Any]) -> MultimodalInputs:
        """Cut the HF processor's output (one prompt) into items, and compute the prompt's M-RoPE positions."""
        ids = processed["input_ids"][0]
        merge = hf_config.vision_config.spatial_merge_size
        items, grids, intervals = [], [], []
        for modality, token_id, pixels_key, grid_key in (
            ("image", hf_config.image_token_id, "pixel_values", "image_grid_thw"),
            ("video", hf_config.video_token_id, "pixel_values_videos", "video_grid_thw"),
        ):
            if processed.get(grid_key) is None:
                continue
            runs = _runs(ids, token_id)
            grid_thw = processed[grid_key]
            sizes = grid_thw.prod(-1).tolist()
            if len(runs) != len(sizes):
                raise ValueError(f"the prompt has {len(runs)} {modality} placeholders for {len(sizes)} {modality}s")
            for index, ((start, length), pixels, grid) in enumerate(
                    zip(runs, processed[pixels_key].split(sizes), grid_thw, strict=True)):
                items.append(MultimodalItem(modality, {"pixel_values": pixels, "grid_thw": grid[None]}, start, length))
                t, h, w = grid.tolist()
                grids.append((t, h // merge, w // merge))
                intervals.append(cls.time_interval(hf_config, processed, modality, index))
        positions, delta = mrope_positions(len(ids), items, grids, intervals)
        return MultimodalInputs(items=sorted(items, key=lambda it: it.offset), mrope_positions=positions,
                                mrope_delta=delta)

    @classmethod
    def time_interval(cls, hf_config: PretrainedConfig, processed: dict[str, Any], modality: str, index: int) -> float:
        """M-RoPE temporal step between consecutive frame pairs of the `index`-th `modality` item: one position
        here; Qwen2.5-VL scales it by the video's frame timing."""
        return 1.0

    # ----- weights -----

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Accepts both layouts: transformers 5 ("model.visual.", "model.language_model.") and the original
        checkpoints ("visual.", "model.")."""
        params = dict(self.named_parameters())
        text_weights = []
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.startswith("model.visual."):
                name = name.removeprefix("model.")
            elif name.startswith("model.language_model."):
                name = "model." + name.removeprefix("model.language_model.")
            if not name.startswith("visual."):
                text_weights.append((name, tensor))
                continue
            if "rotary" in name:  # recomputed, not loaded
                continue
            if name == "visual.patch_embed.proj.weight":
                tensor = tensor.reshape(tensor.shape[0], -1)
            if name not in params:
                raise KeyError(f"checkpoint tensor {name!r} has no parameter in {type(self).__name__}")
            default_weight_loader(params[name], tensor.to(params[name].dtype))
            loaded.add(name)
        return loaded | super().load_weights(text_weights)


def _runs(ids: torch.Tensor, token_id: int) -> list[tuple[int, int]]:
    """(start, length) of each maximal run of `token_id` in ids."""
    mask = (ids == token_id).tolist()
    runs, start = [], None
    for i, m in enumerate([*mask, False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i - start))
            start = None
    return runs


EntryClass = [Qwen2VLForConditionalGeneration]
