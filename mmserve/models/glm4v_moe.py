"""GLM-4.5V: GLM-4.1V's vision tower (`models/glm4v.py`) under the GLM-4.5-Air decoder.

What differs from GLM-4.1V, and all this file holds, is the decoder: the Llama layout (a norm before attention and
before the MLP, no sandwich norms), q/k/v with a bias and the output without, `head_dim` apart from
hidden / heads, M-RoPE on the first `partial_rotary_factor` of each head in the rotate-half layout (so the checkpoint
loads as it is, with no reordering of q and k), and mixtures of experts after the first `first_k_dense_replace`
layers: a sigmoid router with a score-correction bias, grouped top-k and routed scaling, plus a shared expert
(`layers/moe.py`, the router DeepSeek-V3 uses too). The processor, its cutting and the M-RoPE positions are
GLM-4.1V's (`multimodal/processors/glm4v.py`).

Checkpoints give the experts one matrix at a time (`experts.{e}.gate_proj.weight`, stacked into the fused expert
tensors as they load) or fused as transformers 5 keeps them. Decoder layers past `num_hidden_layers` (GLM-4.5's
multi-token-prediction layer, where a checkpoint carries one) are not served and are skipped.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable

import torch
from torch import nn
from transformers import PretrainedConfig

from mmserve.layers.moe import deepseek_moe_mlp
from mmserve.models.glm4v import Glm4vVisionTransformer
from mmserve.models.llama import LlamaModel
from mmserve.models.qwen2_vl import Qwen2VLForConditionalGeneration

_DECODER_LAYER = re.compile(r"^model\.(?:language_model\.)?layers\.(\d+)\.")


class Glm4vMoeForConditionalGeneration(Qwen2VLForConditionalGeneration):
    vision_tower = Glm4vVisionTransformer
    mlp_factory = staticmethod(deepseek_moe_mlp)

    def __init__(self, config: PretrainedConfig):
        nn.Module.__init__(self)
        self.config = config
        # `attention_bias` is the q/k/v bias here; the output projection has none, which the Llama attention
        # reads from the same flag
        text = copy.deepcopy(config.text_config)
        text.attention_bias = False
        self.visual = self.vision_tower(config.vision_config)
        self.model = LlamaModel(text, qkv_bias=bool(config.text_config.attention_bias), mlp_factory=self.mlp_factory)
        self._build_head(config, text)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Qwen2-VL's loading (both layouts), without the decoder layers past `num_hidden_layers`."""
        layers = self.config.text_config.num_hidden_layers

        def served() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                m = _DECODER_LAYER.match(name)
                if m is None or int(m[1]) < layers:
                    yield name, tensor

        return super().load_weights(served())


EntryClass = [Glm4vMoeForConditionalGeneration]
