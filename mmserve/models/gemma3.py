"""Gemma 3: the text decoder (`Gemma3ForCausalLM`) and the vision-language model (`Gemma3ForConditionalGeneration`).

The decoder differs from Llama's in ways that each change the numbers: RMSNorm scales by (1 + w); every block is
"sandwiched" (a norm before and after attention, and before and after the MLP); embeddings are multiplied by
sqrt(hidden); q and k get a per-head RMSNorm; attention scales by `query_pre_attn_scalar`**-0.5; sliding-window and
global layers alternate (`layer_types`), each kind with its own rotary base and scaling; the MLP is tanh-GELU gated.

The vision side is SigLIP (`models/siglip.py`); its patch features are average-pooled to `mm_tokens_per_image`
tokens, RMS-normed and projected by one matrix. As in transformers, the tokens of one image see each other both ways
in every decoder layer (within the window on sliding layers): the model asks the scheduler for its images' spans
(`bidirectional_media`), and the scheduler never ends a prefill chunk inside one. The processor side is
`multimodal/processors/gemma3.py`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from mmserve.attention.base import Attention, AttentionType
from mmserve.forward_batch import ForwardBatch
from mmserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from mmserve.layers.linear import QKVParallelLinear, RowParallelLinear, default_weight_loader
from mmserve.layers.logits import LogitsProcessor
from mmserve.layers.mlp import GatedMLP
from mmserve.layers.rotary import RotaryEmbedding, rope_parameters
from mmserve.layers.vision import pixels_to_device
from mmserve.models.llama import LlamaForCausalLM, head_dim_of, sliding_window_of
from mmserve.models.llava import split_weight_names
from mmserve.models.siglip import SiglipVisionTower
from mmserve.multimodal.embed import embed_multimodal
from mmserve.multimodal.encoder_cache import EncoderCache
from mmserve.multimodal.inputs import MultimodalItem

_ENCODER_CACHE_BYTES = 512 << 20


class GemmaRMSNorm(nn.Module):
    """RMSNorm scaled by (1 + w), the product taken in float32 before the cast back (Gemma's order, not Llama's)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


def layer_rope_parameters(config: PretrainedConfig, layer_type: str) -> dict[str, Any]:
    """The rope settings of one kind of layer: transformers 5 nests them by layer type; older configs give the
    global layers' `rope_theta` (and `rope_scaling`) and the local ones' `rope_local_base_freq`."""
    nested = getattr(config, "rope_parameters", None) or {}
    if isinstance(nested.get(layer_type), dict):
        params = dict(nested[layer_type])
        params.setdefault("rope_type", params.get("type", "default"))
        return params
    if layer_type == "sliding_attention":
        return {"rope_type": "default", "rope_theta": getattr(config, "rope_local_base_freq", 10000.0)}
    return rope_parameters(config)


class Gemma3Attention(nn.Module):
    """`qk_norm=False`: Gemma 2's attention, which has no per-head q/k norms; it caps its scores instead
    (`attn_logit_softcapping`, which Gemma 3's text model refuses)."""

    def __init__(self, config: PretrainedConfig, layer_id: int, rotary_emb: RotaryEmbedding,
                 attn_type: AttentionType, qk_norm: bool = True):
        super().__init__()
        self.head_dim = head_dim_of(config)
        bias = getattr(config, "attention_bias", False)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, bias=bias)
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=bias)
        self.num_heads = self.qkv_proj.q_size // self.head_dim
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.q_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.rotary_emb = rotary_emb
        self.attn = Attention(self.num_heads, self.head_dim, self.num_kv_heads, layer_id,
                              scaling=config.query_pre_attn_scalar**-0.5,
                              sliding_window=sliding_window_of(config, layer_id), attn_type=attn_type,
                              logit_cap=getattr(config, "attn_logit_softcapping", None))

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden_states).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = q.reshape(-1, self.num_heads, self.head_dim), k.reshape(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q.flatten(1), k.flatten(1), v, batch))


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_id: int, rotary_emb: RotaryEmbedding,
                 attn_type: AttentionType, qk_norm: bool = True):
        super().__init__()
        dim, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Gemma3Attention(config, layer_id, rotary_emb, attn_type, qk_norm)
        self.mlp = GatedMLP(dim, config.intermediate_size, config.hidden_activation)
        self.input_layernorm = GemmaRMSNorm(dim, eps)
        self.post_attention_layernorm = GemmaRMSNorm(dim, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(dim, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(dim, eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(positions, self.input_layernorm(x), batch))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3TextModel(nn.Module):
    """`attn_type`: DECODER for text, DECODER_BIDIRECTIONAL where image tokens see each other both ways."""

    def __init__(self, config: PretrainedConfig, attn_type: AttentionType = AttentionType.DECODER):
        super().__init__()
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError("Gemma 3 with use_bidirectional_attention (an embedding model) is not supported")
        if getattr(config, "attn_logit_softcapping", None) is not None:
            raise ValueError("Gemma 3 with attn_logit_softcapping is not supported (not checked against transformers)")
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.embed_scale = config.hidden_size**0.5
        head_dim = head_dim_of(config)
        layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
        # one rotary table per kind of layer (local and global layers have their own base), shared by its layers
        rotary = {kind: RotaryEmbedding(head_dim, config.max_position_embeddings, layer_rope_parameters(config, kind))
                  for kind in sorted(set(layer_types))}
        self.layers = nn.ModuleList(Gemma3DecoderLayer(config, i, rotary[layer_types[i]], attn_type)
                                    for i in range(config.num_hidden_layers))
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        # the scale is rounded to the weights' dtype first, as transformers does
        embeds = self.embed_tokens(input_ids)
        return embeds * torch.tensor(self.embed_scale, dtype=embeds.dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch,
                input_embeds: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(input_ids) if input_embeds is None else input_embeds
        for layer in self.layers:
            x = layer(positions, x, batch)
        return self.norm(x)


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    return logits if cap is None else torch.tanh(logits / cap) * cap


class Gemma3ForCausalLM(LlamaForCausalLM):
    """The text-only checkpoints (Gemma 3 1B, or a text config alone). Weight names and packing as Llama's."""

    text_model: type[nn.Module] = Gemma3TextModel  # Gemma 2's head is this one over its own decoder

    def __init__(self, config: PretrainedConfig):
        nn.Module.__init__(self)
        self.config = config
        self.model = self.text_model(config)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        self.tied = bool(getattr(config, "tie_word_embeddings", True))
        if self.tied:
            self.lm_head.tie_to(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.final_softcap = getattr(config, "final_logit_softcapping", None)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        hidden_states = self.model(input_ids, positions, batch)
        if batch.pooling:  # served with --is-embedding: the hidden states, which the cap does not touch
            return self.logits_processor(hidden_states, self.lm_head, batch)
        return softcap(self.logits_processor(hidden_states, self.lm_head, batch), self.final_softcap)


class Gemma3MultiModalProjector(nn.Module):
    """[images, patches, vision hidden] -> [images, mm_tokens_per_image, text hidden]: average pooling over square
    blocks of patches, RMSNorm, one matrix."""

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        vc = config.vision_config
        self.mm_input_projection_weight = nn.Parameter(torch.zeros(vc.hidden_size, config.text_config.hidden_size))
        self.mm_soft_emb_norm = GemmaRMSNorm(vc.hidden_size, vc.layer_norm_eps)
        self.patches_per_side = vc.image_size // vc.patch_size
        tokens_per_side = int(config.mm_tokens_per_image**0.5)
        self.pool = nn.AvgPool2d(self.patches_per_side // tokens_per_side)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images, _, dim = x.shape
        side = self.patches_per_side
        pooled = self.pool(x.transpose(1, 2).reshape(images, dim, side, side)).flatten(2).transpose(1, 2)
        return torch.matmul(self.mm_soft_emb_norm(pooled), self.mm_input_projection_weight).type_as(x)


class Gemma3ForConditionalGeneration(Gemma3ForCausalLM):
    # the scheduler gives each image's tokens as a bidirectional span, and ends no prefill chunk inside one
    bidirectional_media = True
    direct_weights: tuple[str, ...] = ("vision_tower.", "multi_modal_projector.")

    def __init__(self, config: PretrainedConfig):
        nn.Module.__init__(self)
        self.config = config
        text = config.text_config
        self.vision_tower = SiglipVisionTower(config.vision_config)
        self.multi_modal_projector = Gemma3MultiModalProjector(config)
        self.model = Gemma3TextModel(text, attn_type=AttentionType.DECODER_BIDIRECTIONAL)
        self.lm_head = ParallelLMHead(text.vocab_size, text.hidden_size)
        self.tied = bool(getattr(text, "tie_word_embeddings", True) and getattr(config, "tie_word_embeddings", True))
        if self.tied:
            self.lm_head.tie_to(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(text.vocab_size)
        self.final_softcap = getattr(text, "final_logit_softcapping", None)
        self.encoder_cache = EncoderCache(_ENCODER_CACHE_BYTES)

    # ----- forward -----

    def encode(self, items: list[MultimodalItem]) -> list[torch.Tensor]:
        """Projected features [mm_tokens_per_image, hidden] for each item (an image, or one pan-and-scan crop)."""
        pixels = pixels_to_device([it.features["pixel_values"] for it in items],
                                  self.vision_tower.post_layernorm.weight.device)
        states = self.vision_tower(pixels)
        return list(self.multi_modal_projector(states))

    def embed(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """The step's input embeddings: text scaled by sqrt(hidden), image features placed as they are."""
        return embed_multimodal(input_ids, batch, self.model.embed, self.encode, self.encoder_cache)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch,
                input_embeds: torch.Tensor | None = None) -> torch.Tensor:
        embeds = self.embed(input_ids, batch) if input_embeds is None else input_embeds
        hidden_states = self.model(input_ids, positions, batch, input_embeds=embeds)
        return softcap(self.logits_processor(hidden_states, self.lm_head, batch), self.final_softcap)

    # ----- weights -----

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Accepts transformers 5's layout ("model.language_model.", "model.vision_tower.vision_model.",
        "model.multi_modal_projector.", "lm_head.") and the older one ("language_model.model.",
        "vision_tower.vision_model.", "multi_modal_projector.", "language_model.lm_head.")."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()

        def text_weights() -> Iterable[tuple[str, torch.Tensor]]:
            for direct, name, tensor in split_weight_names(weights, self.direct_weights):
                if not direct:
                    yield name, tensor
                elif not name.startswith("vision_tower.head."):  # SigLIP's pooling head, which Gemma 3 never uses
                    if name not in params:
                        raise KeyError(f"checkpoint tensor {name!r} has no parameter in {type(self).__name__}")
                    default_weight_loader(params[name], tensor)
                    loaded.add(name)

        return loaded | super().load_weights(text_weights())


EntryClass = [Gemma3ForCausalLM, Gemma3ForConditionalGeneration]
