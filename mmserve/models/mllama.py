"""Llama 3.2 Vision (Mllama): a Llama decoder with gated cross-attention layers (at `cross_attention_layers`) that
read each request's images, under a tiled ViT.

An image is one `<|image|>` token in the text (processor side: `multimodal/processors/mllama.py`). The tower sees
it as up to `max_num_tiles` tiles (zero tiles pad the rest) with learned, gated embeddings per aspect ratio; a local
encoder and a gated global one both run over all tiles of the image at once, and the output is the last state
concatenated with chosen local layers' states, projected to the text width: `tiles x (patches + 1)` rows per image.

What a request's cross-attention reads is kept per image, not in the paged KV pool: each cross-attention layer's K
(normed) and V of an image, computed once at the first step that needs them, in the slabs of a `CrossKVCache`
(`cache/cross_kv.py`; the model's `encoder_cache`, keyed by the item's hash, so a repeated image is not encoded
again). The paged pool has the self-attention layers only; the slabs take a share of the KV budget (one image at
the most tiles per `tokens_per_image` tokens of the pool). A running request pins its images (by its request-pool
row, from its first prefill step until the scheduler releases it: `release_row`), and the scheduler admits a
request only while its new images fit beside the pinned ones (`cross_rows_needed`).

Prefill steps attend per request with SDPA and the masks below. Decode steps need no host work: at its prefill,
a request's row of `cross_table` lists the slab slots of the rows its generated tokens see and `cross_lens` their
number (0: no images), and every cross-attention layer runs the backend's `forward_cross_decode` over them, so
decode is captured in CUDA graphs like any model's. A request whose images did not fit the slabs (admitted
alone, its images kept outside them) keeps the decode steps it is in eager: the others still read the slabs, and it
attends per request to the images its token sees.

Which images a token sees follows transformers' `cross_attention_mask` (`cross_attention_spans`): tokens from an
image's token on, up to the next image's; generated tokens as the prompt's last. A token before the first image
sees none: transformers then lets it attend to all of the request's vision rows uniformly (its mask row is all
zeros, not all masked) and zeroes only the layer's MLP output for it, which is matched here. A prompt without
images skips the cross-attention layers altogether, as transformers does (in a decode step that reads the slabs,
its attention and MLP terms are multiplied by 0).

Tensor parallelism splits the cross-attention heads like self-attention's; the tower runs whole on every rank.
Not yet: prefill steps from CUDA graphs (`supports_prefill_graph`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from mmserve.attention.base import Attention, AttentionType
from mmserve.cache.cross_kv import CrossEntry, CrossKVCache
from mmserve.distributed.parallel_state import get_tp_size
from mmserve.forward_batch import ForwardBatch, ForwardMode
from mmserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from mmserve.layers.linear import ColumnParallelLinear, RowParallelLinear, default_weight_loader
from mmserve.layers.logits import LogitsProcessor
from mmserve.layers.mlp import GatedMLP
from mmserve.layers.norm import RMSNorm
from mmserve.layers.vision import VisionMLP
from mmserve.models.llama import LlamaDecoderLayer, LlamaForCausalLM, build_rotary, head_dim_of
from mmserve.models.llava import split_weight_names
from mmserve.multimodal.inputs import MultimodalInputs, MultimodalItem, is_pad
from mmserve.multimodal.processors.mllama import OPEN_END, cross_attention_spans

# ----- the tiled vision tower -----

class MllamaTileEmbedding(nn.Module):
    """One learned vector per (aspect ratio, tile), gated, added to every patch of the tile (before and after the
    local encoder)."""

    def __init__(self, vc: PretrainedConfig):
        super().__init__()
        self.tiles, self.dim = vc.max_num_tiles, vc.hidden_size
        self.embedding = nn.Embedding(vc.max_aspect_ratio_id + 1, vc.max_num_tiles * vc.hidden_size)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, ratio_ids: torch.Tensor) -> torch.Tensor:
        """x [images, tiles, patches, dim]."""
        return x + self.embedding(ratio_ids).view(-1, self.tiles, 1, self.dim) * self.gate.tanh()


class MllamaPositionEmbedding(nn.Module):
    """Patch positions shared by all tiles, blended by a gate with positions learned per (aspect ratio, tile)."""

    def __init__(self, vc: PretrainedConfig, patches: int):
        super().__init__()
        self.tiles, self.patches, self.dim = vc.max_num_tiles, patches, vc.hidden_size
        self.gate = nn.Parameter(torch.zeros(1))
        self.embedding = nn.Parameter(torch.zeros(patches, vc.hidden_size))
        self.tile_embedding = nn.Embedding(vc.max_aspect_ratio_id + 1, vc.max_num_tiles * patches * vc.hidden_size)

    def forward(self, x: torch.Tensor, ratio_ids: torch.Tensor) -> torch.Tensor:
        gate = self.gate.tanh()
        x = x + (1 - gate) * self.embedding
        return x + gate * self.tile_embedding(ratio_ids).view(-1, self.tiles, self.patches, self.dim)


class MllamaVisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(dim, dim, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor, rows: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """x [images, rows, dim]; per image, its real rows and its padding rows (`MllamaVisionModel.forward`): a
        real row sees every row, a padding row only the real ones. Two unmasked attentions per image, not one
        with a mask: SDPA has no flash kernel for a mask, and the masked one took 2.8 ms a layer at 4 tiles on
        the H100 (docs/benchmarks.md)."""
        q, k, v = (proj(x).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = torch.empty_like(q)
        for i, (real, padding) in enumerate(rows):
            qi, ki, vi = q[i:i + 1], k[i:i + 1], v[i:i + 1]
            out[i, :, real] = F.scaled_dot_product_attention(qi[:, :, real], ki, vi)[0]
            out[i, :, padding] = F.scaled_dot_product_attention(qi[:, :, padding], ki[:, :, real], vi[:, :, real])[0]
        return self.o_proj(out.transpose(1, 2).flatten(2))


class MllamaVisionLayer(nn.Module):
    """Pre-norm block; the global encoder's blocks scale both branches by learned tanh gates."""

    def __init__(self, vc: PretrainedConfig, gated: bool):
        super().__init__()
        self.self_attn = MllamaVisionAttention(vc.hidden_size, vc.attention_heads)
        self.mlp = VisionMLP(vc.hidden_size, vc.intermediate_size, vc.hidden_act)
        self.input_layernorm = nn.LayerNorm(vc.hidden_size, eps=vc.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(vc.hidden_size, eps=vc.norm_eps)
        self.gated = gated
        if gated:
            self.gate_attn = nn.Parameter(torch.zeros(1))
            self.gate_ffn = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, rows: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(x), rows)
        x = x + (self.gate_attn.tanh() * attn if self.gated else attn)
        mlp = self.mlp(self.post_attention_layernorm(x))
        return x + (self.gate_ffn.tanh() * mlp if self.gated else mlp)


class MllamaVisionEncoder(nn.Module):
    def __init__(self, vc: PretrainedConfig, num_layers: int, gated: bool):
        super().__init__()
        self.layers = nn.ModuleList(MllamaVisionLayer(vc, gated) for _ in range(num_layers))


class MllamaVisionModel(nn.Module):
    def __init__(self, vc: PretrainedConfig):
        super().__init__()
        self.tiles = vc.max_num_tiles
        self.patches = (vc.image_size // vc.patch_size) ** 2 + 1  # with the class token
        # transformers pads each tile's rows to a multiple of 8; with none to add, its mask marks every row padding
        if self.patches % 8 == 0:
            raise ValueError(f"Mllama with {self.patches} rows per tile (a multiple of 8) is not supported")
        self.padded = self.patches + (-self.patches) % 8
        self.intermediate = list(vc.intermediate_layers_indices)
        self.patch_embedding = nn.Conv2d(vc.num_channels, vc.hidden_size, vc.patch_size, vc.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(vc.hidden_size))
        self.gated_positional_embedding = MllamaPositionEmbedding(vc, self.patches)
        self.pre_tile_positional_embedding = MllamaTileEmbedding(vc)
        self.post_tile_positional_embedding = MllamaTileEmbedding(vc)
        self.layernorm_pre = nn.LayerNorm(vc.hidden_size)
        self.layernorm_post = nn.LayerNorm(vc.hidden_size)
        self.transformer = MllamaVisionEncoder(vc, vc.num_hidden_layers, gated=False)
        self.global_transformer = MllamaVisionEncoder(vc, vc.num_global_layers, gated=True)

    def forward(self, pixels: torch.Tensor, ratio_ids: torch.Tensor, ratio_mask: torch.Tensor) -> torch.Tensor:
        """pixels [images, tiles, C, H, W], ratio_ids [images], ratio_mask [images, tiles] ->
        [images, tiles, patches + 1, vision_output_dim]."""
        images, tiles = pixels.shape[:2]
        x = self.patch_embedding(pixels.flatten(0, 1).to(self.patch_embedding.weight.dtype))
        x = self.pre_tile_positional_embedding(x.flatten(2).transpose(1, 2).unflatten(0, (images, tiles)), ratio_ids)
        x = torch.cat([self.class_embedding.expand(images, tiles, 1, -1), x], dim=2)
        x = self.layernorm_pre(self.gated_positional_embedding(x, ratio_ids))
        x = F.pad(x, (0, 0, 0, self.padded - self.patches))
        # Rows of padding tiles and the rows padding each tile: transformers masks a pair only when BOTH rows are
        # padding, so real rows see the padding too (the checkpoints were trained so)
        padding = (ratio_mask == 0)[:, :, None].expand(images, tiles, self.padded).clone()
        padding[:, :, self.patches:] = True
        padding = padding.flatten(1)
        rows = [(torch.nonzero(~pad).flatten(), torch.nonzero(pad).flatten()) for pad in padding]
        x = x.flatten(1, 2)
        kept = []
        for layer in self.transformer.layers:
            x = layer(x, rows)
            kept.append(x)
        x = self.post_tile_positional_embedding(self.layernorm_post(x).unflatten(1, (tiles, self.padded)), ratio_ids)
        x = x.flatten(1, 2)
        for layer in self.global_transformer.layers:
            x = layer(x, rows)
        features = torch.stack([kept[i] for i in self.intermediate], dim=-1).flatten(2)
        x = torch.cat([x, features], dim=-1).unflatten(1, (tiles, self.padded))
        return x[:, :, :self.patches]


# ----- the decoder's cross-attention -----

@dataclass
class CrossContext:
    """One request's view of its images for an eager step: each cross-attention layer's K and V [rows, kv_heads,
    head_dim], which rows each of the step's tokens sees (`allowed` [tokens, rows]), and whether it sees any
    (`seen` [tokens, 1]: 0 before the first image)."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    allowed: torch.Tensor
    seen: torch.Tensor


@dataclass
class CrossDecode:
    """A decode step: the cache, the table of slots per request-pool row, each request's number of rows there
    (`lens` [B]) and whether it has images at all (`active` [B, 1], 0 or 1 in the model's dtype); `outside`: for a
    request whose images are outside the slabs, its batch index and the K, V [cross layers, rows, kv_heads,
    head_dim] its token sees (eager steps only)."""

    cache: CrossKVCache
    table: torch.Tensor
    lens: torch.Tensor
    active: torch.Tensor
    outside: list[tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=list)


class MllamaCrossAttention(nn.Module):
    """Heads split across tensor-parallel ranks like self-attention's (each rank keeps its key/value heads of every
    image); the key/value heads must divide among the ranks."""

    def __init__(self, config: PretrainedConfig, index: int):
        super().__init__()
        heads, kv_heads, tp = config.num_attention_heads, config.num_key_value_heads, get_tp_size()
        if kv_heads % tp:
            raise ValueError(f"Mllama's cross-attention layers split {kv_heads} key/value heads across ranks: "
                             f"--tp-size {tp} does not divide them")
        self.num_heads, self.num_kv_heads = heads // tp, kv_heads // tp
        self.head_dim = config.hidden_size // heads
        dim = config.hidden_size
        self.q_proj = ColumnParallelLinear(dim, heads * self.head_dim)
        self.k_proj = ColumnParallelLinear(dim, kv_heads * self.head_dim)
        self.v_proj = ColumnParallelLinear(dim, kv_heads * self.head_dim)
        self.o_proj = RowParallelLinear(heads * self.head_dim, dim)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        # the backend's handle for decode steps; `index` is this layer's place among the cross-attention layers
        self.attn = Attention(self.num_heads, self.head_dim, self.num_kv_heads, index, attn_type=AttentionType.CROSS)

    def key_values(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected vision rows [rows, hidden] -> K, V [rows, kv_heads, head_dim] (K normed per head)."""
        k = self.k_norm(self.k_proj(states).unflatten(-1, (self.num_kv_heads, self.head_dim)))
        return k, self.v_proj(states).unflatten(-1, (self.num_kv_heads, self.head_dim))

    def query(self, x: torch.Tensor) -> torch.Tensor:
        return self.q_norm(self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim)))

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """x [tokens, hidden] of one request; k, v [rows, kv_heads, head_dim]."""
        q = self.query(x).transpose(0, 1)
        groups = self.num_heads // self.num_kv_heads
        k, v = (t.transpose(0, 1).repeat_interleave(groups, dim=0) for t in (k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.o_proj(out.transpose(0, 1).flatten(1))

    def decode(self, x: torch.Tensor, batch: ForwardBatch, cross: CrossDecode) -> torch.Tensor:
        """x [B, hidden], one token per request, over the request's rows in the slabs (or, for a request whose
        images are outside them, over those)."""
        i = self.attn.layer_id
        q = self.query(x)
        out = self.attn.backend.forward_cross_decode(q, self.attn, batch, cross.cache.k[i], cross.cache.v[i],
                                                     cross.table, cross.lens)
        groups = self.num_heads // self.num_kv_heads
        for b, k, v in cross.outside:
            k_b, v_b = (t[i].transpose(0, 1).repeat_interleave(groups, dim=0) for t in (k, v))
            out[b] = F.scaled_dot_product_attention(q[b][:, None], k_b, v_b)[:, 0]
        return self.o_proj(out.flatten(1))


class MllamaCrossDecoderLayer(nn.Module):
    """Cross-attention to the request's images, then an MLP, each scaled by a learned tanh gate into the residual."""

    def __init__(self, config: PretrainedConfig, index: int):
        super().__init__()
        self.cross_attn = MllamaCrossAttention(config, index)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, ctx: CrossContext) -> torch.Tensor:
        """x [tokens, hidden] of one request."""
        k, v = ctx.kv[self.cross_attn.attn.layer_id]
        x = x + self.cross_attn_attn_gate.tanh() * self.cross_attn(self.input_layernorm(x), k, v, ctx.allowed)
        return x + self.cross_attn_mlp_gate.tanh() * (ctx.seen * self.mlp(self.post_attention_layernorm(x)))

    def decode(self, x: torch.Tensor, batch: ForwardBatch, cross: CrossDecode) -> torch.Tensor:
        """x [B, hidden]: a request without images gets its input back (its attention rows are zeros, and its
        MLP term is multiplied by 0)."""
        x = x + self.cross_attn_attn_gate.tanh() * self.cross_attn.decode(self.input_layernorm(x), batch, cross)
        return x + self.cross_attn_mlp_gate.tanh() * (cross.active * self.mlp(self.post_attention_layernorm(x)))


class MllamaTextModel(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        # 8 rows past the vocabulary: `<|image|>` (= vocab_size in the hub's checkpoints) and spares
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size + 8, config.hidden_size)
        self.cross_layers = sorted(config.cross_attention_layers)
        rotary = build_rotary(config, head_dim_of(config))
        self.layers = nn.ModuleList(
            MllamaCrossDecoderLayer(config, self.cross_layers.index(i)) if i in self.cross_layers
            else LlamaDecoderLayer(config, i, rotary_emb=rotary) for i in range(config.num_hidden_layers))
        # the paged KV pool holds the self-attention layers only, numbered in order
        self.paged_layers = 0
        for layer in self.layers:
            if isinstance(layer, LlamaDecoderLayer):
                layer.self_attn.attn.layer_id = self.paged_layers
                self.paged_layers += 1
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch,
                contexts: list[CrossContext | None] | None, cross: CrossDecode | None = None) -> torch.Tensor:
        """Eager steps give per-request `contexts` (None for a request without images); a decode step that reads
        the slabs gives `cross` instead."""
        hidden, residual = self.embed_tokens(input_ids), None
        bounds = [0]
        for n in batch.extend_lens_cpu:
            bounds.append(bounds[-1] + n)
        for layer in self.layers:
            if not isinstance(layer, MllamaCrossDecoderLayer):
                hidden, residual = layer(positions, hidden, residual, batch)
                continue
            if cross is None and not any(contexts):  # no request of the step has images: transformers skips it
                continue
            if residual is not None:
                hidden, residual = hidden + residual, None
            if cross is not None:
                hidden = layer.decode(hidden, batch, cross)
                continue
            hidden = torch.cat([
                hidden[lo:hi] if ctx is None else layer(hidden[lo:hi], ctx)
                for ctx, lo, hi in zip(contexts, bounds[:-1], bounds[1:], strict=True)])
        hidden, _ = self.norm(hidden, residual) if residual is not None else (self.norm(hidden), None)
        return hidden


# ----- the model -----

@dataclass
class _RequestImages:
    """A running request's images, the token spans that see each, each one's real tiles, and the cache keys it pins;
    `source` is the request's MultimodalInputs, which tells one request from the next in the same row; `placed`:
    its decode row of the table is written."""

    source: MultimodalInputs
    items: list[MultimodalItem]
    spans: list[tuple[int, int]]
    tiles: list[int]
    keys: list[int]
    placed: bool = False

    def decoded(self, rows_per_tile: int) -> list[tuple[int, int]]:
        """(hash, rows of its real tiles) of each image its generated tokens see: the last span's."""
        return [(it.hash, tiles * rows_per_tile) for it, (_, end), tiles in zip(self.items, self.spans, self.tiles,
                                                                                strict=True) if end == OPEN_END]


class MllamaForConditionalGeneration(LlamaForCausalLM):
    # a prefill step looks up each request's images on the host; decode steps are captured
    supports_prefill_graph = False
    direct_weights: tuple[str, ...] = ("vision_model.", "multi_modal_projector.")
    # images a generated token may see and still decode from the table (more: that request decodes eagerly)
    decode_table_images = 4
    # the slabs get one image at the most tiles per this many tokens of the paged pool (at 11B: 6,404 rows of 32 KiB
    # for 1,024 tokens of 128 KiB, so 60% of the budget), so that as many requests with an image run as fit there
    tokens_per_image = 1024

    def __init__(self, config: PretrainedConfig):
        nn.Module.__init__(self)
        self.config = config
        text = config.text_config
        self.image_token_id = config.image_token_index
        self.vision_model = MllamaVisionModel(config.vision_config)
        self.multi_modal_projector = nn.Linear(config.vision_config.vision_output_dim, text.hidden_size)
        self.model = MllamaTextModel(text)
        self.paged_kv_layers = self.model.paged_layers
        self.lm_head = ParallelLMHead(text.vocab_size, text.hidden_size)
        self.tied = False
        self.logits_processor = LogitsProcessor(text.vocab_size)
        # per image, every cross-attention layer's K/V, by item hash: slabs the runner sizes (`attach_cross_kv`)
        self.encoder_cache: CrossKVCache | None = None
        self.cross_table: torch.Tensor | None = None  # [request-pool rows, width] slab slots
        self.cross_lens: torch.Tensor | None = None  # [request-pool rows]: rows of the table in use
        self.cross_active: torch.Tensor | None = None  # [request-pool rows]: 1 where the request has images
        self._requests: dict[int, _RequestImages] = {}  # request-pool row -> its images
        self._eager_rows: set[int] = set()  # rows whose request decodes eagerly (images outside the slabs)

    @property
    def image_rows(self) -> int:
        """Rows an image takes in the slabs: every tile's (padding tiles too, which the tower computes)."""
        return self.vision_model.tiles * self.vision_model.patches

    @property
    def cross_kv_bytes_per_token(self) -> int:
        """The slabs' share of the KV budget, per token of the paged pool: one image at the most tiles per
        `tokens_per_image` tokens (`attach_cross_kv` sizes them so)."""
        attn = self._cross_attn()
        row = CrossKVCache.bytes_per_row(len(self.model.cross_layers), attn.num_kv_heads, attn.head_dim,
                                         self.multi_modal_projector.weight.dtype)
        return math.ceil(row * self.image_rows / self.tokens_per_image)

    def _cross_attn(self) -> MllamaCrossAttention:
        return self.model.layers[self.model.cross_layers[0]].cross_attn

    def attach_cross_kv(self, tokens: int, table_rows: int, rows: int | None = None) -> None:
        """Slabs for the images' K/V beside a paged pool of `tokens` tokens (one image per `tokens_per_image`
        tokens, at least one image; `rows` overrides), and the decode table over `table_rows` request-pool rows
        (the runner calls it once it has sized the KV cache)."""
        attn, weight = self._cross_attn(), self.multi_modal_projector.weight
        if rows is None:
            rows = max(math.ceil(tokens * self.image_rows / self.tokens_per_image), self.image_rows)
        self.encoder_cache = CrossKVCache(rows, len(self.model.cross_layers), attn.num_kv_heads, attn.head_dim,
                                          weight.dtype, weight.device)
        width = min(rows, self.decode_table_images * self.image_rows)
        self.cross_table = torch.zeros(table_rows, width, dtype=torch.int64, device=weight.device)
        self.cross_lens = torch.zeros(table_rows, dtype=torch.int64, device=weight.device)
        self.cross_active = torch.zeros(table_rows, dtype=weight.dtype, device=weight.device)

    def cross_rows_needed(self, mm: MultimodalInputs | None, counted: set[int]) -> int:
        """Slab rows a waiting request's images would take (the scheduler's admission): those no running request
        holds, each counted once per step (`counted`); an unpinned entry counts too, as pinning it takes it from
        what could be evicted."""
        images = {it.hash for it in (mm.items if mm is not None else []) if it.modality == "image"}
        new = [key for key in images - counted if not self.encoder_cache.pinned(key)]
        counted.update(images)
        return len(new) * self.image_rows

    def cross_rows_free(self) -> int:
        return self.encoder_cache.available_rows()

    # ----- images -----

    def encode(self, items: list[MultimodalItem]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per item, its K and V for every cross-attention layer: [cross layers, rows, kv_heads, head_dim] each."""
        device = self.multi_modal_projector.weight.device
        pixels = torch.stack([it.features["pixel_values"] for it in items]).to(device)
        ratio_ids = torch.cat([it.features["aspect_ratio_ids"] for it in items]).to(device)
        ratio_mask = torch.stack([it.features["aspect_ratio_mask"] for it in items]).to(device)
        states = self.multi_modal_projector(self.vision_model(pixels, ratio_ids, ratio_mask)).flatten(1, 2)
        layers = [self.model.layers[i].cross_attn for i in self.model.cross_layers]
        out = []
        for rows in states:
            kv = [attn.key_values(rows) for attn in layers]
            out.append((torch.stack([k for k, _ in kv]), torch.stack([v for _, v in kv])))
        return out

    def encoder_cost(self, item: MultimodalItem) -> int:
        """Rows the tower computes for an item (the scheduler's per-step encoder budget): every tile of an image,
        padding tiles included; none for the text before the first image."""
        return 0 if item.modality == "text" else self.vision_model.tiles * self.vision_model.padded

    def release_row(self, row: int) -> None:
        """The request in this request-pool row left the engine (or was retracted): its images are unpinned and
        its decode row reads nothing."""
        req = self._requests.pop(row, None)
        self._eager_rows.discard(row)
        if req is not None:
            self.encoder_cache.unpin(req.keys)
            if req.placed:
                self.cross_lens[row] = 0
                self.cross_active[row] = 0

    def _track(self, batch: ForwardBatch, rows: list[int]) -> None:
        """A prefill step carries each request's media: remember them by request-pool row and pin them (a row
        whose request has none forgets what an earlier request there had)."""
        for row, mm in zip(rows, batch.mm_inputs or [None] * len(rows), strict=True):
            if row in self._requests and self._requests[row].source is mm:
                continue
            self.release_row(row)
            images = [it for it in mm.items if it.modality == "image"] if mm is not None else []
            if images:
                keys = [it.ensure_hash() for it in images]
                self.encoder_cache.pin(keys)
                self._requests[row] = _RequestImages(
                    mm, images, cross_attention_spans([it.offset for it in images]),
                    [int(it.features["aspect_ratio_mask"].sum()) for it in images], keys)

    def _token_ids(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """A prefill step's ids with each image's pad value back to `<|image|>` and the text before the first image
        (an item, for the prefix cache's sake) back to its own ids."""
        ids = input_ids.masked_fill(is_pad(input_ids), self.image_token_id)
        offset = 0
        for mm, n, start in zip(batch.mm_inputs or [], batch.extend_lens_cpu, batch.prefix_lens_cpu, strict=False):
            for item in (mm.items if mm is not None else []):
                lo, hi = max(item.offset, start), min(item.end, start + n)
                if item.modality == "text" and lo < hi:
                    text = item.features["input_ids"][lo - item.offset:hi - item.offset]
                    ids[offset + lo - start:offset + hi - start] = text.to(ids.device)
            offset += n
        return ids

    def _entries(self, found: list[_RequestImages | None]) -> dict[int, CrossEntry]:
        """The cache entries of the requests' images, encoding those not there."""
        cache = self.encoder_cache
        needed = list({it.hash: it for req in found if req is not None for it in req.items}.values())
        missing = [it for it in needed if it.hash not in cache]
        if missing:
            for item, (k, v) in zip(missing, self.encode(cache.prepare(missing)), strict=True):
                cache.put(item.hash, k, v)
        return {it.hash: cache.get(it.hash) for it in needed}

    def _place(self, row: int, req: _RequestImages, entries: dict[int, CrossEntry]) -> None:
        """Write the request's decode row: the slots of the real tiles' rows of the images its generated tokens see
        (the last span's); eager decoding for it where one of those is outside the slabs or they outgrow the
        table."""
        req.placed = True
        self.cross_active[row] = 1
        seen = req.decoded(self.vision_model.patches)
        if any(entries[key].slots is None for key, _ in seen):
            self._eager_rows.add(row)
            return
        slots = torch.cat([entries[key].slots[:n] for key, n in seen])
        if slots.numel() > self.cross_table.shape[1]:
            self._eager_rows.add(row)
            return
        self.cross_table[row, :slots.numel()] = slots
        self.cross_lens[row] = slots.numel()

    def _contexts(self, batch: ForwardBatch, rows: list[int]) -> list[CrossContext | None]:
        found = [self._requests.get(row) for row in rows]
        if not any(found):
            return [None] * len(rows)
        entries = self._entries(found)
        for row, req in zip(rows, found, strict=True):
            if req is not None and not req.placed:
                self._place(row, req, entries)
        rows_per_tile = self.vision_model.patches
        contexts: list[CrossContext | None] = []
        gathered: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # K, V [cross layers, rows, kv_heads, head_dim]
        for req, seq_len, n in zip(found, batch.seq_lens_cpu, batch.extend_lens_cpu, strict=True):
            if req is None:
                contexts.append(None)
                continue
            for it in req.items:  # each image gathered from the slabs once a step, however many requests see it
                if it.hash not in gathered:
                    gathered[it.hash] = self.encoder_cache.key_values(entries[it.hash])
            parts = [gathered[it.hash] for it in req.items]
            k, v = parts[0] if len(parts) == 1 else (torch.cat([part[0] for part in parts], dim=1),
                                                     torch.cat([part[1] for part in parts], dim=1))
            tokens = torch.arange(seq_len - n, seq_len)
            allowed = torch.zeros(n, k.shape[1], dtype=torch.bool)
            at = 0
            for (start, end), tiles, part in zip(req.spans, req.tiles, parts, strict=True):
                sees = (tokens >= start) & (tokens < end)
                allowed[:, at:at + tiles * rows_per_tile] = sees[:, None]
                at += part[0].shape[1]
            seen = allowed.any(dim=1, keepdim=True)
            allowed |= ~seen  # a token that sees no image attends to every vision row alike, as transformers has it
            contexts.append(CrossContext(list(zip(k, v, strict=True)), allowed.to(k.device),
                                         seen.to(k.device, k.dtype)))
        return contexts

    def _outside(self, batch: ForwardBatch) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """For each request of a decode step whose images are outside the slabs: its batch index and the K, V of
        the real tiles of the images its token sees (a host sync, only while such a request runs)."""
        if not self._eager_rows:
            return []
        outside = []
        for b, row in enumerate(batch.req_pool_indices.tolist()):
            if row not in self._eager_rows:
                continue
            seen = [(self.encoder_cache.key_values(self.encoder_cache.get(key)), n)
                    for key, n in self._requests[row].decoded(self.vision_model.patches)]
            outside.append((b, torch.cat([k[:, :n] for (k, _), n in seen], dim=1),
                            torch.cat([v[:, :n] for (_, v), n in seen], dim=1)))
        return outside

    def decode_capturable(self, batch: ForwardBatch) -> bool:
        """Whether a decode step reads only the slabs (every request's rows there, or no images): then it needs no
        host work and a graph may replay it."""
        return not self._eager_rows or self._eager_rows.isdisjoint(batch.req_pool_indices.tolist())

    # ----- forward -----

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        if self.encoder_cache is None:
            raise RuntimeError("Mllama needs its cross-attention slabs: attach_cross_kv (the model runner does)")
        if batch.mode == ForwardMode.DECODE:
            rows = batch.req_pool_indices
            cross = CrossDecode(self.encoder_cache, self.cross_table, self.cross_lens[rows],
                                self.cross_active[rows][:, None], self._outside(batch))
            hidden_states = self.model(input_ids, positions, batch, None, cross)
        else:
            rows = batch.req_pool_indices.tolist()
            if batch.mode == ForwardMode.EXTEND:
                self._track(batch, rows)
                input_ids = self._token_ids(input_ids, batch)
            hidden_states = self.model(input_ids, positions, batch, self._contexts(batch, rows))
        return self.logits_processor(hidden_states, self.lm_head, batch)

    # ----- weights -----

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Accepts transformers 5's layout ("model.language_model.", "model.vision_model.",
        "model.multi_modal_projector.", "lm_head.") and the older one ("language_model.model.", "vision_model.",
        "multi_modal_projector.", "language_model.lm_head."). The cross-attention layers' own tensors load as they
        are (their q/k/v stay apart: q reads the text, k and v the images)."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()

        def decoder_weights() -> Iterable[tuple[str, torch.Tensor]]:
            for direct, name, tensor in split_weight_names(weights, self.direct_weights):
                if direct or ".cross_attn" in name:
                    if name not in params:
                        raise KeyError(f"checkpoint tensor {name!r} has no parameter in {type(self).__name__}")
                    param = params[name]
                    getattr(param, "weight_loader", default_weight_loader)(param, tensor)
                    loaded.add(name)
                else:
                    yield name, tensor

        return loaded | super().load_weights(decoder_weights())


EntryClass = [MllamaForConditionalGeneration]
