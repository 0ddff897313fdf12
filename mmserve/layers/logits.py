"""Logits for the positions a step needs (each request's last token), gathered across vocabulary shards; on an
embedding server, those positions' hidden states instead."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from mmserve.distributed.parallel_state import tp_all_gather
from mmserve.layers.embedding import ParallelLMHead

if TYPE_CHECKING:
    from mmserve.forward_batch import ForwardBatch


class LogitsProcessor(nn.Module):
    def __init__(self, vocab_size: int, logit_scale: float = 1.0):
        super().__init__()
        self.vocab_size = vocab_size
        self.logit_scale = logit_scale

    def forward(self, hidden_states: torch.Tensor, lm_head: ParallelLMHead, batch: ForwardBatch) -> torch.Tensor:
        """float32 logits [len(batch.logits_indices), vocab] (all positions when logits_indices is None)."""
        if batch.logits_indices is not None:
            hidden_states = hidden_states[batch.logits_indices]
        if batch.pooling:  # a generative checkpoint served for embeddings (--is-embedding): no LM head
            return hidden_states.float()
        logits = tp_all_gather(F.linear(hidden_states, lm_head.weight))[:, : self.vocab_size]
        if self.logit_scale != 1.0:
            logits = logits * self.logit_scale
        return logits.float()
