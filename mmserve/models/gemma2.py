"""Gemma 2: the text decoder (`Gemma2ForCausalLM`) and its score head (`Gemma2ForSequenceClassification`, the
reward models).

Gemma 2 shares Gemma 3's numerics (`models/gemma3.py`: (1 + w) RMSNorm, sandwich norms around attention and the
MLP, embeddings scaled by sqrt(hidden), tanh-GELU gated MLP, `query_pre_attn_scalar`), without Gemma 3's per-head
q/k norms and with one rotary base for every layer. What it adds is softcapping: attention scores pass through
cap * tanh(score / cap) before the softmax (`attn_logit_softcapping`, an `Attention.logit_cap`, which only the
torch backend runs) and so do the final logits (`final_logit_softcapping`). Sliding-window and global layers
alternate (`layer_types`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from mmserve.attention.base import Attention
from mmserve.forward_batch import ForwardBatch
from mmserve.layers.embedding import VocabParallelEmbedding
from mmserve.layers.linear import QKVParallelLinear, RowParallelLinear
from mmserve.layers.mlp import GatedMLP
from mmserve.layers.rotary import RotaryEmbedding
from mmserve.models.gemma3 import Gemma3ForCausalLM, GemmaRMSNorm
from mmserve.models.llama import (
    LlamaForSequenceClassification,
    build_rotary,
    head_dim_of,
    sliding_window_of,
)


class Gemma2Attention(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_id: int, rotary_emb: RotaryEmbedding):
        super().__init__()
        self.head_dim = head_dim_of(config)
        bias = getattr(config, "attention_bias", False)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, bias=bias)
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=bias)
        self.num_heads = self.qkv_proj.q_size // self.head_dim
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.rotary_emb = rotary_emb
        self.attn = Attention(self.num_heads, self.head_dim, self.num_kv_heads, layer_id,
                              scaling=config.query_pre_attn_scalar**-0.5,
                              sliding_window=sliding_window_of(config, layer_id),
                              logit_cap=getattr(config, "attn_logit_softcapping", None))

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden_states).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q.reshape(-1, self.num_heads, self.head_dim),
                               k.reshape(-1, self.num_kv_heads, self.head_dim))
        return self.o_proj(self.attn(q.flatten(1), k.flatten(1), v, batch))


class Gemma2DecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_id: int, rotary_emb: RotaryEmbedding):
        super().__init__()
        dim, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Gemma2Attention(config, layer_id, rotary_emb)
        self.mlp = GatedMLP(dim, config.intermediate_size, config.hidden_activation)
        self.input_layernorm = GemmaRMSNorm(dim, eps)
        self.post_attention_layernorm = GemmaRMSNorm(dim, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(dim, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(dim, eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(positions, self.input_layernorm(x), batch))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma2TextModel(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.embed_scale = config.hidden_size**0.5
        rotary = build_rotary(config, head_dim_of(config))  # one base for local and global layers alike
        self.layers = nn.ModuleList(Gemma2DecoderLayer(config, i, rotary) for i in range(config.num_hidden_layers))
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        x = x * torch.tensor(self.embed_scale, dtype=x.dtype)  # the scale rounded to the weights' dtype first
        for layer in self.layers:
            x = layer(positions, x, batch)
        return self.norm(x)


class Gemma2ForCausalLM(Gemma3ForCausalLM):
    """Gemma 3's text head (tied LM head, final logit softcap) over the Gemma 2 decoder."""

    text_model = Gemma2TextModel


class Gemma2ForSequenceClassification(LlamaForSequenceClassification):
    """The Gemma 2 decoder and a linear score per label on the last non-padding token (reward models such as
    Skywork-Reward-Gemma-2); the final logit cap belongs to the LM head, so scores are not capped."""

    def __init__(self, config: PretrainedConfig):
        nn.Module.__init__(self)
        self.config = config
        self.model = Gemma2TextModel(config)
        self.tied = False
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)


EntryClass = [Gemma2ForCausalLM, Gemma2ForSequenceClassification]
