"""Mistral: the Llama decoder with a sliding attention window on every layer (when the config sets one)."""

from mmserve.models.llama import LlamaEmbeddingModel, LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    pass


class MistralModel(LlamaEmbeddingModel):  # e5-mistral
    pass


EntryClass = [MistralForCausalLM, MistralModel]
