"""Qwen3-MoE: the Qwen3 decoder (per-head q/k RMSNorm) whose MLPs are mixtures of experts (`layers/moe.py`),
except in `mlp_only_layers` and in layers that `decoder_sparse_step` skips, which keep the dense gated MLP."""

from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig

from mmserve.layers.moe import SparseMoeBlock
from mmserve.models.llama import dense_mlp
from mmserve.models.qwen3 import Qwen3ForCausalLM


def qwen_moe_mlp(config: PretrainedConfig, layer_id: int, norm_topk_prob: bool | None = None) -> nn.Module:
    """The layer's MLP as the Qwen MoE configs place them; `norm_topk_prob` None takes the config's."""
    sparse = (layer_id not in (getattr(config, "mlp_only_layers", None) or []) and config.num_experts > 0
              and (layer_id + 1) % getattr(config, "decoder_sparse_step", 1) == 0)
    if not sparse:
        return dense_mlp(config, layer_id)
    if norm_topk_prob is None:
        norm_topk_prob = bool(getattr(config, "norm_topk_prob", False))
    return SparseMoeBlock(config.hidden_size, config.moe_intermediate_size, config.num_experts,
                          config.num_experts_per_tok, norm_topk_prob, config.hidden_act)


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    mlp_factory = staticmethod(qwen_moe_mlp)


EntryClass = [Qwen3MoeForCausalLM]
