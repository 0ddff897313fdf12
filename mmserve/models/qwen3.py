"""Qwen3: the Llama decoder with per-head RMSNorm on q and k before rotary; also its embedder (`*Model`) and
score head (`*ForSequenceClassification`)."""

from mmserve.models.llama import LlamaEmbeddingModel, LlamaForCausalLM, LlamaForSequenceClassification


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True


class Qwen3Model(LlamaEmbeddingModel):
    qk_norm = True


class Qwen3ForSequenceClassification(LlamaForSequenceClassification):
    qk_norm = True


EntryClass = [Qwen3ForCausalLM, Qwen3Model, Qwen3ForSequenceClassification]
