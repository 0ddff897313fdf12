"""Llama (1, 2, 3.x, SmolLM) decoder; also the base that Mistral, Qwen2 and Qwen3 specialise.

A decoder layer is pre-norm attention then pre-norm gated MLP, each with a residual. The attention block
takes the two switches that separate the families: a bias on q/k/v (Qwen2) and a per-head RMSNorm on q and
k before rotary (Qwen3). Without the LM head the same decoder serves embedders (`LlamaEmbeddingModel`, HF's
`LlamaModel` checkpoints) and score heads (`LlamaForSequenceClassification`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from transformers import PretrainedConfig

from mmserve.attention.base import Attention
from mmserve.distributed.parallel_state import get_tp_size
from mmserve.forward_batch import ForwardBatch
from mmserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from mmserve.layers.linear import QKVParallelLinear, RowParallelLinear, default_weight_loader
from mmserve.layers.logits import LogitsProcessor
from mmserve.layers.mlp import GatedMLP
from mmserve.layers.moe import expert_weight_target
from mmserve.layers.norm import RMSNorm
from mmserve.layers.rotary import MRotaryEmbedding, RotaryEmbedding, rope_parameters


def head_dim_of(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def sliding_window_of(config: PretrainedConfig, layer_id: int) -> int | None:
    """The layer's attention window: per-layer `layer_types` when present, else one window for all layers."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[layer_id] == "sliding_attention" else None
    return window


MLPFactory = Callable[[PretrainedConfig, int], nn.Module]


def dense_mlp(config: PretrainedConfig, layer_id: int) -> nn.Module:
    return GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act,
                    bias=getattr(config, "mlp_bias", False))


def build_rotary(config: PretrainedConfig, head_dim: int) -> RotaryEmbedding:
    """The model's rotary table. Built once per model and shared by every layer: a table per layer would cost
    layers x max_position x head_dim x 8 bytes (about 4 GB for Llama-3.1-8B's 131072 positions)."""
    params = rope_parameters(config)
    if params.get("mrope_section"):  # Qwen2-VL style 3-D positions
        return MRotaryEmbedding(head_dim, config.max_position_embeddings, params, params["mrope_section"],
                                bool(params.get("mrope_interleaved")))
    return RotaryEmbedding(head_dim, config.max_position_embeddings, params)


class LlamaAttention(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_id: int, qkv_bias: bool = False, qk_norm: bool = False,
                 rotary_emb: RotaryEmbedding | None = None):
        super().__init__()
        tp = get_tp_size()
        self.head_dim = head_dim_of(config)
        num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        attention_bias = getattr(config, "attention_bias", False)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, config.num_attention_heads,
                                          num_kv_heads, bias=qkv_bias or attention_bias)
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size,
                                        bias=attention_bias)
        self.num_heads = config.num_attention_heads // tp
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = qk_norm
        # one table for the whole model (see build_rotary); built here only when a layer is used on its own
        self.rotary_emb = rotary_emb if rotary_emb is not None else build_rotary(config, self.head_dim)
        self.attn = Attention(self.num_heads, self.head_dim, self.num_kv_heads, layer_id,
                              sliding_window=sliding_window_of(config, layer_id))

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden_states).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q.flatten(1), k.flatten(1), v, batch))


class LlamaDecoderLayer(nn.Module):
    """`mlp_factory` builds the layer's feed-forward block from (config, layer_id): the gated MLP by default, a
    mixture of experts in MoE models."""

    def __init__(self, config: PretrainedConfig, layer_id: int, qkv_bias: bool = False, qk_norm: bool = False,
                 rotary_emb: RotaryEmbedding | None = None, mlp_factory: MLPFactory = dense_mlp):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_id, qkv_bias=qkv_bias, qk_norm=qk_norm, rotary_emb=rotary_emb)
        self.mlp = mlp_factory(config, layer_id)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None,
                batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, hidden_states = hidden_states, self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, batch)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class LlamaModel(nn.Module):
    def __init__(self, config: PretrainedConfig, qkv_bias: bool = False, qk_norm: bool = False,
                 mlp_factory: MLPFactory = dense_mlp):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        rotary = build_rotary(config, head_dim_of(config))
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, qkv_bias=qkv_bias, qk_norm=qk_norm, rotary_emb=rotary, mlp_factory=mlp_factory)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch,
                input_embeds: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids) if input_embeds is None else input_embeds
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual, batch)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LlamaForCausalLM(nn.Module):
    qkv_bias = False
    qk_norm = False
    mlp_factory: MLPFactory = staticmethod(dense_mlp)  # MoE families swap in their block
    # HF checkpoint name -> (our merged parameter, shard id)
    packed_modules = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, qkv_bias=self.qkv_bias, qk_norm=self.qk_norm, mlp_factory=self.mlp_factory)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        if self.tied:
            self.lm_head.tie_to(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        hidden_states = self.model(input_ids, positions, batch)
        return self.logits_processor(hidden_states, self.lm_head, batch)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors (HF names) into our parameters; returns the names of parameters loaded."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name or (self.tied and name == "lm_head.weight"):
                continue
            parts = name.split(".")
            packed = next((p for p in parts if p in self.packed_modules), None)
            expert = expert_weight_target(name)
            if expert is not None:  # one expert's matrix, copied into the fused expert tensors
                target, shard_id = expert
                param = params[target]
                param.weight_loader(param, tensor, shard_id)
            elif packed is not None:
                merged, shard_id = self.packed_modules[packed]
                target = ".".join(merged if p == packed else p for p in parts)
                param = params[target]
                param.weight_loader(param, tensor, shard_id)
            else:
                target = name
                if target not in params:
                    raise KeyError(f"checkpoint tensor {name!r} has no parameter in {type(self).__name__}")
                param = params[target]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(target)
        return loaded


class LlamaEmbeddingModel(LlamaForCausalLM):
    """The decoder without its LM head: an embedder (a `*Model` checkpoint, or a causal one served with
    --is-embedding). `forward` returns the final hidden states of the rows the pooler asks for
    (`batch.logits_indices`), in float32. Checkpoints saved from the bare decoder name tensors without `model.`."""

    def __init__(self, config: PretrainedConfig):
        nn.Module.__init__(self)
        self.config = config
        self.model = LlamaModel(config, qkv_bias=self.qkv_bias, qk_norm=self.qk_norm, mlp_factory=self.mlp_factory)
        self.tied = False

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        hidden_states = self.model(input_ids, positions, batch)
        if batch.logits_indices is not None:
            hidden_states = hidden_states[batch.logits_indices]
        return self.head(hidden_states)

    def head(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states.float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        own = ("model.", "score.")
        return super().load_weights((name if name.startswith(own) else f"model.{name}", tensor)
                                    for name, tensor in weights if not name.startswith("lm_head."))


class LlamaForSequenceClassification(LlamaEmbeddingModel):
    """A score head (reward models, classifiers): a linear map of the pooled token's hidden state to one score per
    label. The pooler picks the last token that is not padding, as transformers does."""

    def __init__(self, config: PretrainedConfig):
        super().__init__(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)

    def head(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.score(hidden_states).float()


def architecture(name: str, cls: type[nn.Module]) -> type[nn.Module]:
    """`cls` registered under the architecture `name`, for a name this module already uses for something else
    (HF's `LlamaModel` checkpoint, where our `LlamaModel` is the decoder stack)."""
    return type(name, (cls,), {"__module__": cls.__module__, "__doc__": cls.__doc__})


EntryClass = [LlamaForCausalLM, LlamaForSequenceClassification, architecture("LlamaModel", LlamaEmbeddingModel)]
