"""CLIP (`CLIPModel`) as an embedding model: the text tower and the image tower, each with its projection into the
shared space, as transformers' `get_text_features` / `get_image_features` give them (the pooler normalises).

A text is a request of its tokens. The text tower is a pre-norm transformer with learned absolute positions and a
causal mask, run over the paged KV cache as any decoder (so chunked prefill and the prefix cache apply); its final
LayerNorm'd state at the last token (the tokenizer's end-of-text, which CLIP pools) is projected.

An image is a request of one placeholder token whose item carries the processor's pixels
(`multimodal/tower_inputs.py`): its row of the output is the image tower's pooled state (the class token after
`post_layernorm`), projected. The two kinds of request share a step; the text tower also runs over an image
request's lone token, whose result is replaced.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import PretrainedConfig

from mmserve.attention.base import Attention
from mmserve.distributed.parallel_state import get_tp_size
from mmserve.forward_batch import ForwardBatch
from mmserve.layers.linear import default_weight_loader
from mmserve.layers.vision import pixels_to_device
from mmserve.models.clip import CLIPEncoderLayer, CLIPVisionTower
from mmserve.multimodal.inputs import MultimodalItem, is_pad


class CLIPTextAttention(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_id: int):
        super().__init__()
        dim, heads = config.hidden_size, config.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.out_proj = nn.Linear(dim, dim)
        self.attn = Attention(heads, dim // heads, heads, layer_id)  # causal, as CLIP's text mask is

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        return self.out_proj(self.attn(self.q_proj(x), self.k_proj(x), self.v_proj(x), batch))


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(input_ids) + self.position_embedding(positions)


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(CLIPEncoderLayer(config, CLIPTextAttention(config, i))
                                           for i in range(config.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        x = self.embeddings(input_ids, positions)
        for layer in self.encoder.layers:
            x = layer(x, batch)
        return self.final_layer_norm(x)


class CLIPVisionTransformer(CLIPVisionTower):
    """The whole image tower and its pooled head: the class token's last state through `post_layernorm`."""

    def __init__(self, vc: PretrainedConfig):
        super().__init__(vc, [vc.num_hidden_layers])
        self.post_layernorm = nn.LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)

    def pooled(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.post_layernorm(self(pixel_values)[0][:, 0])


class CLIPModel(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        if get_tp_size() > 1:
            raise ValueError("CLIPModel runs on one GPU (its towers are small): drop --tp-size")
        self.config = config
        self.text_model = CLIPTextTransformer(config.text_config)
        self.vision_model = CLIPVisionTransformer(config.vision_config)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=False)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)

    def encode_images(self, items: list[MultimodalItem]) -> torch.Tensor:
        """Projected image features [items, projection_dim]."""
        pixels = pixels_to_device([it.features["pixel_values"] for it in items],
                                  self.visual_projection.weight.device)
        return self.visual_projection(self.vision_model.pooled(pixels))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """[rows the pooler asks for, projection_dim] in float32: text rows from the text tower, an image
        request's row from the image tower."""
        media = is_pad(input_ids)
        out = self.text_projection(self.text_model(input_ids.masked_fill(media, 0), positions, batch))
        rows, items, offset = [], [], 0
        for mm, n, start in zip(batch.mm_inputs or [None] * batch.batch_size, batch.extend_lens_cpu,
                                batch.prefix_lens_cpu, strict=True):
            for item in (mm.items if mm else []):
                if start <= item.offset < start + n:
                    rows.append(offset + item.offset - start)
                    items.append(item)
            offset += n
        if items:
            out = out.clone()
            out[rows] = self.encode_images(items).to(out.dtype)
        if batch.logits_indices is not None:
            out = out[batch.logits_indices]
        return out.float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """transformers' names as they are; `logit_scale` (the contrastive temperature) is not an embedding's."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if name == "logit_scale" or name.endswith("position_ids"):
                continue
            if name not in params:
                raise KeyError(f"checkpoint tensor {name!r} has no parameter in CLIPModel")
            default_weight_loader(params[name], tensor)
            loaded.add(name)
        return loaded


EntryClass = [CLIPModel]
