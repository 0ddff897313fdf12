"""Mistral: the Llama decoder with a sliding attention window on every layer (when the config sets one)."""

from mmserve.models.llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    pass


EntryClass = [MistralForCausalLM]
