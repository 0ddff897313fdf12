"""Llama 3.2 Vision (Mllama): a Llama decoder with gated cross-attention layers (at `cross_attention_layers`) that
read each request's images, under a tiled ViT.

An image is one `<|image|>` token in the text (processor side: `multimodal/processors/mllama.py`). The tower sees
it as up to `max_num_tiles` tiles (zero tiles pad the rest) with learned, gated embeddings per aspect ratio; a local
encoder and a gated global one both run over all tiles of the image at once, and the output is the last state
concatenated with chosen local layers' states, projected to the text width: `tiles x (patches + 1)` rows per image.

What a request's cross-attention reads is kept per media item, not in the paged KV pool: each cross-attention
layer's K (normed) and V of an image, computed once at the first step that needs them and stored in the model's
`encoder_cache` (an LRU bounded in bytes, keyed by the item's hash, so a repeated image is not encoded again).
The model remembers each running request's images by its request-pool row (set at every prefill step, where the
batch carries the request's media; decode steps find them there), so chunked prefill and decode read the same
states. Cross-attention itself is SDPA per request.

Which images a token sees follows transformers' `cross_attention_mask` (`cross_attention_spans`): tokens from an
image's token on, up to the next image's; generated tokens as the prompt's last. A token before the first image
sees none: transformers then lets it attend to all of the request's vision rows uniformly (its mask row is all
zeros, not all masked) and zeroes only the layer's MLP output for it, which is matched here. A prompt without
images skips the cross-attention layers altogether, as transformers does.

Refused in this first version: CUDA graphs (`supports_cuda_graph`: the cross-attention state is looked up per
request on the host), tensor parallelism.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from mmserve.distributed.parallel_state import get_tp_size
from mmserve.forward_batch import ForwardBatch, ForwardMode
from mmserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from mmserve.layers.linear import default_weight_loader
from mmserve.layers.logits import LogitsProcessor
from mmserve.layers.mlp import GatedMLP
from mmserve.layers.norm import RMSNorm
from mmserve.layers.vision import VisionMLP
from mmserve.models.llama import LlamaDecoderLayer, LlamaForCausalLM, build_rotary, head_dim_of
from mmserve.models.llava import split_weight_names
from mmserve.multimodal.encoder_cache import EncoderCache
from mmserve.multimodal.inputs import MultimodalInputs, MultimodalItem, is_pad
from mmserve.multimodal.processors.mllama import cross_attention_spans

_ENCODER_CACHE_BYTES = 512 << 20


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

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """x [images, rows, dim]; allowed [images, 1, rows, rows] (True: the query row may see the key row)."""
        q, k, v = (proj(x).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
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

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(x), allowed)
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
        allowed = ~(padding[:, :, None] & padding[:, None, :])[:, None]
        x = x.flatten(1, 2)
        kept = []
        for layer in self.transformer.layers:
            x = layer(x, allowed)
            kept.append(x)
        x = self.post_tile_positional_embedding(self.layernorm_post(x).unflatten(1, (tiles, self.padded)), ratio_ids)
        x = x.flatten(1, 2)
        for layer in self.global_transformer.layers:
            x = layer(x, allowed)
        features = torch.stack([kept[i] for i in self.intermediate], dim=-1).flatten(2)
        x = torch.cat([x, features], dim=-1).unflatten(1, (tiles, self.padded))
        return x[:, :, :self.patches]


# ----- the decoder's cross-attention -----

@dataclass
class CrossContext:
    """One request's view of its images for this step: each cross-attention layer's K and V [kv_heads, rows,
    head_dim], which rows each of the step's tokens sees (`allowed` [tokens, rows]), and whether it sees any
    (`seen` [tokens, 1]: 0 before the first image)."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    allowed: torch.Tensor
    seen: torch.Tensor


class MllamaCrossAttention(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // self.num_heads
        dim = config.hidden_size
        self.q_proj = nn.Linear(dim, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def key_values(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected vision rows [rows, hidden] -> K, V [kv_heads, rows, head_dim] (K normed per head)."""
        k = self.k_norm(self.k_proj(states).unflatten(-1, (self.num_kv_heads, self.head_dim)))
        v = self.v_proj(states).unflatten(-1, (self.num_kv_heads, self.head_dim))
        return k.transpose(0, 1), v.transpose(0, 1)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """x [tokens, hidden] of one request."""
        q = self.q_norm(self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim))).transpose(0, 1)
        groups = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(groups, dim=0), v.repeat_interleave(groups, dim=0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.o_proj(out.transpose(0, 1).flatten(1))


class MllamaCrossDecoderLayer(nn.Module):
    """Cross-attention to the request's images, then an MLP, each scaled by a learned tanh gate into the residual."""

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.cross_attn = MllamaCrossAttention(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, layer: int, ctx: CrossContext) -> torch.Tensor:
        """x [tokens, hidden] of one request; `layer` indexes the cross-attention layers."""
        k, v = ctx.kv[layer]
        x = x + self.cross_attn_attn_gate.tanh() * self.cross_attn(self.input_layernorm(x), k, v, ctx.allowed)
        return x + self.cross_attn_mlp_gate.tanh() * (ctx.seen * self.mlp(self.post_attention_layernorm(x)))


class MllamaTextModel(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        # 8 rows past the vocabulary: `<|image|>` (= vocab_size in the hub's checkpoints) and spares
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size + 8, config.hidden_size)
        self.cross_layers = sorted(config.cross_attention_layers)
        rotary = build_rotary(config, head_dim_of(config))
        self.layers = nn.ModuleList(
            MllamaCrossDecoderLayer(config) if i in self.cross_layers
            else LlamaDecoderLayer(config, i, rotary_emb=rotary) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch,
                contexts: list[CrossContext | None]) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        bounds = [0]
        for n in batch.extend_lens_cpu:
            bounds.append(bounds[-1] + n)
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, MllamaCrossDecoderLayer):
                hidden, residual = layer(positions, hidden, residual, batch)
                continue
            if not any(contexts):  # no request of the step has images: transformers skips the layer
                continue
            if residual is not None:
                hidden, residual = hidden + residual, None
            cross = self.cross_layers.index(i)
            hidden = torch.cat([
                hidden[lo:hi] if ctx is None else layer(hidden[lo:hi], cross, ctx)
                for ctx, lo, hi in zip(contexts, bounds[:-1], bounds[1:], strict=True)])
        hidden, _ = self.norm(hidden, residual) if residual is not None else (self.norm(hidden), None)
        return hidden


# ----- the model -----

@dataclass
class _RequestImages:
    """A running request's images (kept to re-encode one whose K/V the cache let go), the token spans that see
    each, and each one's real tiles; `source` is the request's MultimodalInputs, which tells one request from the
    next in the same row."""

    source: MultimodalInputs
    items: list[MultimodalItem]
    spans: list[tuple[int, int]]
    tiles: list[int]


class MllamaForConditionalGeneration(LlamaForCausalLM):
    # the cross-attention state is found per request on the host at every step: not capturable yet
    supports_cuda_graph = False
    direct_weights: tuple[str, ...] = ("vision_model.", "multi_modal_projector.")

    def __init__(self, config: PretrainedConfig):
        nn.Module.__init__(self)
        if get_tp_size() > 1:
            raise ValueError("Mllama (Llama 3.2 Vision) with tensor parallelism is not supported yet")
        self.config = config
        text = config.text_config
        self.image_token_id = config.image_token_index
        self.vision_model = MllamaVisionModel(config.vision_config)
        self.multi_modal_projector = nn.Linear(config.vision_config.vision_output_dim, text.hidden_size)
        self.model = MllamaTextModel(text)
        self.lm_head = ParallelLMHead(text.vocab_size, text.hidden_size)
        self.tied = False
        self.logits_processor = LogitsProcessor(text.vocab_size)
        # K/V of every cross-attention layer per image, by item hash (the runner resizes it to --mm-cache-size-mb)
        self.encoder_cache = EncoderCache(_ENCODER_CACHE_BYTES)
        self._requests: dict[int, _RequestImages] = {}  # request-pool row -> its images

    # ----- images -----

    def encode(self, items: list[MultimodalItem]) -> list[torch.Tensor]:
        """Per item, its K and V for every cross-attention layer: [cross layers, 2, kv_heads, rows, head_dim]."""
        device = self.multi_modal_projector.weight.device
        pixels = torch.stack([it.features["pixel_values"] for it in items]).to(device)
        ratio_ids = torch.cat([it.features["aspect_ratio_ids"] for it in items]).to(device)
        ratio_mask = torch.stack([it.features["aspect_ratio_mask"] for it in items]).to(device)
        states = self.multi_modal_projector(self.vision_model(pixels, ratio_ids, ratio_mask)).flatten(1, 2)
        layers = [self.model.layers[i].cross_attn for i in self.model.cross_layers]
        return [torch.stack([torch.stack(attn.key_values(rows)) for attn in layers]) for rows in states]

    def _track(self, batch: ForwardBatch, rows: list[int]) -> None:
        """A prefill step carries each request's media: remember them by request-pool row (a row whose request has
        none forgets what an earlier request there had)."""
        for row, mm in zip(rows, batch.mm_inputs or [None] * len(rows), strict=True):
            images = [it for it in mm.items if it.modality == "image"] if mm is not None else []
            if not images:
                self._requests.pop(row, None)
            elif row not in self._requests or self._requests[row].source is not mm:
                self._requests[row] = _RequestImages(
                    mm, images, cross_attention_spans([it.offset for it in images]),
                    [int(it.features["aspect_ratio_mask"].sum()) for it in images])

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

    def _contexts(self, batch: ForwardBatch, rows: list[int]) -> list[CrossContext | None]:
        found = [self._requests.get(row) for row in rows]
        needed = list({it.ensure_hash(): it for req in found if req is not None for it in req.items}.values())
        if not needed:
            return [None] * len(rows)
        cache = self.encoder_cache
        keys = [it.hash for it in needed]
        cache.pin(keys)
        try:
            missing = [it for it in needed if it.hash not in cache]
            if missing:
                for item, kv in zip(missing, self.encode(cache.prepare(missing)), strict=True):
                    cache.put(item.hash, kv)
            kv = {key: cache.get(key) for key in keys}
        finally:
            cache.unpin(keys)
        contexts: list[CrossContext | None] = []
        for req, seq_len, n in zip(found, batch.seq_lens_cpu, batch.extend_lens_cpu, strict=True):
            if req is None:
                contexts.append(None)
                continue
            parts = [kv[it.hash] for it in req.items]  # [cross layers, 2, kv_heads, rows, head_dim] each
            joined = torch.cat(parts, dim=3)
            rows_per_tile = parts[0].shape[3] // self.vision_model.tiles
            tokens = torch.arange(seq_len - n, seq_len)
            allowed = torch.zeros(n, joined.shape[3], dtype=torch.bool)
            at = 0
            for (start, end), tiles, part in zip(req.spans, req.tiles, parts, strict=True):
                sees = (tokens >= start) & (tokens < end)
                allowed[:, at:at + tiles * rows_per_tile] = sees[:, None]
                at += part.shape[3]
            seen = allowed.any(dim=1, keepdim=True)
            allowed |= ~seen  # a token that sees no image attends to every vision row alike, as transformers has it
            device = joined.device
            contexts.append(CrossContext([(layer[0], layer[1]) for layer in joined], allowed.to(device),
                                         seen.to(device, joined.dtype)))
        return contexts

    # ----- forward -----

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
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
                    default_weight_loader(params[name], tensor)
                    loaded.add(name)
                else:
                    yield name, tensor

        return loaded | super().load_weights(decoder_weights())


EntryClass = [MllamaForConditionalGeneration]
