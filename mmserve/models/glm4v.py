"""GLM-4.1V: a Qwen2-VL-style ViT (14x14 patches, 2-D rotary, attention within each frame) with a learned position
table resampled bicubically to each frame's grid, a 2x2 strided conv that merges patches, and a GLU merger; the
GLM-4 decoder, whose blocks are sandwiched (a norm before and after attention and the MLP) and whose M-RoPE turns
only the first half of each head (`partial_rotary_factor`) in interleaved pairs.

The decoder's rotary runs in our rotate-half layout: the checkpoint's interleaved pairs (2i, 2i+1) of q and k are
reordered to (i, i + rotary_dim / 2) when they load. q.k is a sum over the head's dimensions, so the same
reordering of q and k leaves attention as it was, and rotating the pair (2i, 2i+1) by band i is then rotating
(i, i + half) by band i, which is what `MRotaryEmbedding` does.

A video reaches the tower frame by frame: the processor writes a timestamp between frames, so each frame is an item
of its own with a one-frame grid (`multimodal/processors/glm4v.py`, which also computes the M-RoPE positions).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from mmserve.attention.base import Attention
from mmserve.distributed.parallel_state import get_tp_size
from mmserve.forward_batch import ForwardBatch
from mmserve.layers.embedding import VocabParallelEmbedding
from mmserve.layers.linear import QKVParallelLinear, RowParallelLinear, default_weight_loader
from mmserve.layers.mlp import GatedMLP
from mmserve.layers.norm import RMSNorm
from mmserve.layers.rotary import MRotaryEmbedding, rope_parameters
from mmserve.layers.vision import (
    Grid,
    PackedSeqs,
    PatchEmbed,
    VisionAttention,
    VisionBlock,
    VisionPlan,
    VisionRotary,
    frame_lengths,
    host_grids,
    patch_positions,
)
from mmserve.models.qwen2_vl import Qwen2VLForConditionalGeneration

# ----- vision -----

class LearnedPositions(nn.Module):
    """A square table of position embeddings learned for one grid, resampled (bicubic, edges clamped) at each
    patch's centre in its frame's grid, so every frame spans the whole table whatever its size."""

    def __init__(self, num_positions: int, dim: int):
        super().__init__()
        self.side = math.isqrt(num_positions)
        assert self.side**2 == num_positions, f"{num_positions} positions do not make a square table"
        self.position_embedding = nn.Embedding(num_positions, dim)

    def forward(self, positions: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        """positions, sizes [N, 2] int ((row, column) of each patch, (rows, columns) of its frame) -> [N, dim]."""
        table = self.position_embedding.weight
        image = table.view(self.side, self.side, -1).permute(2, 0, 1)[None].float()
        # grid_sample takes (x, y) = (column, row) in [-1, 1] across the table's outer edges; padding patches of a
        # CUDA graph have size 0, clamped to 1 so that their coordinates stay finite
        centre = ((positions.flip(-1).float() + 0.5) / sizes.flip(-1).float().clamp(min=1)) * 2 - 1
        out = F.grid_sample(image, centre[None, :, None], mode="bicubic", align_corners=False, padding_mode="border")
        return out[0, :, :, 0].t().to(table.dtype)


def _load_downsample_weight(param: nn.Parameter, loaded: torch.Tensor) -> None:
    """The conv's [out, C, m, m] weight as a matmul over a merged unit's patches laid out [m, m, C]."""
    default_weight_loader(param, loaded.permute(0, 2, 3, 1).reshape(param.shape))


class GlmPatchMerger(GatedMLP):
    """A projection, LayerNorm and GELU before the gated MLP (whose `gate_proj`/`up_proj` load into
    `gate_up_proj`), all under the checkpoint's `merger.` names."""

    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__(dim, hidden, act)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.post_projection_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.gelu(self.post_projection_norm(self.proj(x))))


class Glm4vVisionTransformer(nn.Module):
    def __init__(self, vc: PretrainedConfig):
        super().__init__()
        self.merge = vc.spatial_merge_size
        dim, eps = vc.hidden_size, vc.rms_norm_eps
        self.patch_embed = PatchEmbed(vc.in_channels * vc.temporal_patch_size * vc.patch_size**2, dim, bias=True)
        self.post_conv_layernorm = RMSNorm(dim, eps)
        if not isinstance(vc.image_size, int) or not isinstance(vc.patch_size, int):
            raise ValueError(f"GLM-4.1V's vision image_size and patch_size must be single numbers (a square position "
                             f"table), got {vc.image_size!r} and {vc.patch_size!r}")
        self.embeddings = LearnedPositions((vc.image_size // vc.patch_size) ** 2, dim)
        theta = (getattr(vc, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        self.rotary = VisionRotary(dim // vc.num_heads, theta)
        # the blocks' MLP is as wide as the tower's output (out_hidden_size), as the reference builds it
        self.blocks = nn.ModuleList(
            VisionBlock(dim, vc.num_heads, GatedMLP(dim, vc.out_hidden_size, vc.hidden_act), RMSNorm, eps=eps,
                        attn=VisionAttention(dim, vc.num_heads, bias=vc.attention_bias, proj_bias=False))
            for _ in range(vc.depth))
        self.post_layernorm = RMSNorm(dim, eps)
        self.downsample = nn.Linear(dim * self.merge**2, vc.out_hidden_size)
        self.downsample.weight.weight_loader = _load_downsample_weight
        self.merger = GlmPatchMerger(vc.out_hidden_size, vc.intermediate_size, vc.hidden_act)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Merged features [tokens, out_hidden] of all items (grid_thw [items, 3] on the host, one frame each)."""
        plan = self.plan(host_grids(grid_thw))
        return self.run(pixel_values, *plan.to_device(self.patch_embed.proj.weight.device))

    def plan(self, grids: Sequence[Grid]) -> VisionPlan:
        """Each patch's (row, column) and its frame's (rows, columns), and the frames as sequences."""
        if any(t != 1 for t, _, _ in grids):
            raise ValueError("the GLM-4.1V tower takes one frame (pair) per item")
        sizes = torch.cat([torch.tensor([[h, w]], dtype=torch.int32).expand(h * w, 2) for _, h, w in grids])
        return VisionPlan({"positions": patch_positions(grids, self.merge), "sizes": sizes},
                          {"frames": frame_lengths(grids)})

    def max_seqlens(self, patches: int) -> dict[str, int]:
        return {"frames": patches}

    def run(self, pixel_values: torch.Tensor, tensors: dict[str, torch.Tensor],
            seqs: dict[str, PackedSeqs]) -> torch.Tensor:
        x = self.post_conv_layernorm(self.patch_embed(pixel_values))
        x = x + self.embeddings(tensors["positions"], tensors["sizes"])
        rotary = self.rotary(tensors["positions"])
        for block in self.blocks:
            x = block(x, rotary, seqs["frames"])
        # the processor keeps each merged unit's patches together, row-major: one row of the strided conv's input
        x = self.post_layernorm(x).view(-1, self.merge**2 * x.shape[-1])
        return self.merger(self.downsample(x))


# ----- decoder -----

class Glm4Attention(nn.Module):
    """q/k/v with bias, output without; M-RoPE on the first `rotary_dim` dimensions of each head."""

    def __init__(self, config: PretrainedConfig, layer_id: int, rotary_emb: MRotaryEmbedding):
        super().__init__()
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, bias=True)
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)
        self.num_heads = config.num_attention_heads // get_tp_size()
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.rotary_emb = rotary_emb
        self.attn = Attention(self.num_heads, self.head_dim, self.num_kv_heads, layer_id)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden_states).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q.reshape(-1, self.num_heads, self.head_dim),
                               k.reshape(-1, self.num_kv_heads, self.head_dim))
        return self.o_proj(self.attn(q.flatten(1), k.flatten(1), v, batch))


class Glm4DecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_id: int, rotary_emb: MRotaryEmbedding):
        super().__init__()
        dim, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Glm4Attention(config, layer_id, rotary_emb)
        self.mlp = GatedMLP(dim, config.intermediate_size, config.hidden_act)
        self.input_layernorm = RMSNorm(dim, eps)
        self.post_self_attn_layernorm = RMSNorm(dim, eps)
        self.post_attention_layernorm = RMSNorm(dim, eps)
        self.post_mlp_layernorm = RMSNorm(dim, eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        x = x + self.post_self_attn_layernorm(self.self_attn(positions, self.input_layernorm(x), batch))
        return x + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(x)))


def glm4_rotary(config: PretrainedConfig) -> MRotaryEmbedding:
    """The decoder's M-RoPE table over `partial_rotary_factor` of each head (transformers 5 moves the checkpoints'
    top-level factor into rope_parameters), sections as the config gives them."""
    params = rope_parameters(config)
    head_dim = config.hidden_size // config.num_attention_heads
    if not params.get("mrope_section"):
        raise ValueError("GLM-4.1V's text config must give rope_parameters.mrope_section")
    return MRotaryEmbedding(head_dim, config.max_position_embeddings, params, params["mrope_section"])


class Glm4TextModel(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.rotary = glm4_rotary(config)  # one table shared by every layer
        self.layers = nn.ModuleList(Glm4DecoderLayer(config, i, self.rotary) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch,
                input_embeds: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed_tokens(input_ids) if input_embeds is None else input_embeds
        for layer in self.layers:
            x = layer(positions, x, batch)
        return self.norm(x)


def half_rotary_layout(tensor: torch.Tensor, head_dim: int, rotary_dim: int) -> torch.Tensor:
    """q or k projection rows (weight or bias) with each head's interleaved rotary pairs (2i, 2i+1) moved to
    (i, i + rotary_dim / 2); the dimensions past rotary_dim stay."""
    order = torch.cat([torch.arange(0, rotary_dim, 2), torch.arange(1, rotary_dim, 2),
                       torch.arange(rotary_dim, head_dim)])
    heads = tensor.reshape(-1, head_dim, *tensor.shape[1:])
    return heads[:, order].reshape(tensor.shape)


class Glm4vForConditionalGeneration(Qwen2VLForConditionalGeneration):
    vision_tower = Glm4vVisionTransformer

    def __init__(self, config: PretrainedConfig):
        nn.Module.__init__(self)
        self.config = config
        text = config.text_config
        self.visual = self.vision_tower(config.vision_config)
        self.model = Glm4TextModel(text)
        self._build_head(config, text)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Qwen2-VL's loading (both layouts), after splitting the decoder's merged `gate_up_proj` into its gate and
        up halves and reordering q and k to the rotate-half layout (module docstring)."""
        rotary = self.model.rotary
        head_dim, rotary_dim = rotary.head_dim, rotary.rotary_dim

        def prepared() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                visual = name.startswith(("visual.", "model.visual."))
                if not visual and ".mlp.gate_up_proj." in name:
                    gate, up = tensor.chunk(2, dim=0)
                    yield name.replace(".gate_up_proj.", ".gate_proj."), gate
                    yield name.replace(".gate_up_proj.", ".up_proj."), up
                    continue
                if not visual and (".self_attn.q_proj." in name or ".self_attn.k_proj." in name):
                    tensor = half_rotary_layout(tensor, head_dim, rotary_dim)
                yield name, tensor

        return super().load_weights(prepared())


EntryClass = [Glm4vForConditionalGeneration]
