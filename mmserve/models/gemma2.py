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

from torch import nn
from transformers import PretrainedConfig

from mmserve.attention.base import AttentionType
from mmserve.layers.embedding import VocabParallelEmbedding
from mmserve.models.gemma3 import Gemma3DecoderLayer, Gemma3ForCausalLM, Gemma3TextModel, GemmaRMSNorm
from mmserve.models.llama import LlamaForSequenceClassification, build_rotary, head_dim_of


class Gemma2TextModel(Gemma3TextModel):
    """Gemma 3's decoder layers without their q/k norms, one rotary table for local and global layers alike."""

    def __init__(self, config: PretrainedConfig):
        nn.Module.__init__(self)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.embed_scale = config.hidden_size**0.5
        rotary = build_rotary(config, head_dim_of(config))
        self.layers = nn.ModuleList(Gemma3DecoderLayer(config, i, rotary, AttentionType.DECODER, qk_norm=False)
                                    for i in range(config.num_hidden_layers))
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)


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
