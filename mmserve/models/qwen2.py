"""Qwen2 / Qwen2.5: the Llama decoder with a bias on the q, k and v projections; also its embedder (`*Model`) and
score head (`*ForSequenceClassification`)."""

from mmserve.models.llama import LlamaEmbeddingModel, LlamaForCausalLM, LlamaForSequenceClassification


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True


class Qwen2Model(LlamaEmbeddingModel):
    qkv_bias = True


class Qwen2ForSequenceClassification(LlamaForSequenceClassification):
    qkv_bias = True


EntryClass = [Qwen2ForCausalLM, Qwen2Model, Qwen2ForSequenceClassification]
