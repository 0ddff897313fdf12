"""Qwen2 / Qwen2.5: the Llama decoder with a bias on the q, k and v projections."""

from mmserve.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True


EntryClass = [Qwen2ForCausalLM]
