"""MediaCausalLM: a Llama-layout decoder whose input embeddings have the media of a step placed in them.

A vision-language model subclasses it with its towers and `encode(items) -> [rows per item]`; `embed` places the
encoder outputs (from the model's EncoderCache where they are already there) at the items' placeholder rows, and
the prefill CUDA graphs run `embed` eagerly and replay the language model from its output
(`forward(..., input_embeds=)`, see runner/cuda_graph.py)."""

from __future__ import annotations

import torch

from mmserve.forward_batch import ForwardBatch
from mmserve.models.llama import LlamaForCausalLM
from mmserve.multimodal.embed import embed_multimodal


class MediaCausalLM(LlamaForCausalLM):
    def embed(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """The step's input embeddings, media encoded and placed: what `forward` starts from."""
        return embed_multimodal(input_ids, batch, self.model.embed_tokens, self.encode, self.encoder_cache)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch,
                input_embeds: torch.Tensor | None = None) -> torch.Tensor:
        embeds = self.embed(input_ids, batch) if input_embeds is None else input_embeds
        hidden_states = self.model(input_ids, positions, batch, input_embeds=embeds)
        return self.logits_processor(hidden_states, self.lm_head, batch)
