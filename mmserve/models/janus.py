"""Janus-Pro, image understanding: a SigLIP-style tower (`models/siglip.py`: patch embeddings plus learned positions,
no class token, pre-norm blocks, the final LayerNorm; the attention's output projection is called
`projection_layer` in the checkpoints) whose last hidden state goes through the aligner MLP into the embedding
rows of the image's placeholder tokens, ahead of a Llama decoder.

Image generation is not served: the VQ model, the generation embeddings, aligner and head are skipped at load, and
our API has no way to ask for image tokens (the processor's `generation_mode` is not a request option).

The processor resizes and pads every image to the tower's size, so each one is a fixed number of tokens,
`<begin_of_image>` + that many `<image_placeholder>` + `<end_of_image>` (the processor side, with the default system
prompt's check: `multimodal/processors/janus.py`).
"""

from __future__ import annotations

from collections.abc import Iterable
from types import SimpleNamespace

import torch
from torch import nn
from transformers import PretrainedConfig

from mmserve.layers.activation import get_act_fn
from mmserve.layers.embedding import ParallelLMHead
from mmserve.layers.linear import default_weight_loader
from mmserve.layers.logits import LogitsProcessor
from mmserve.layers.vision import pixels_to_device
from mmserve.models.llama import LlamaModel
from mmserve.models.media_lm import MediaCausalLM
from mmserve.models.siglip import SiglipVisionTower
from mmserve.multimodal.encoder_cache import EncoderCache
from mmserve.multimodal.inputs import MultimodalItem

_ENCODER_CACHE_BYTES = 512 << 20
# Checkpoint prefixes of the image-generation side, never used to read images
_GENERATION_WEIGHTS = ("model.vqmodel.", "model.generation_embeddings.", "model.generation_aligner.",
                       "model.generation_head.")
def tower_config(vc: PretrainedConfig) -> SimpleNamespace:
    """Janus's vision config in the names SigLIP's blocks read (the MLP's width is `mlp_ratio` times the hidden
    size). Options the blocks do not have are refused."""
    if getattr(vc, "use_qk_norm", False):
        raise ValueError("Janus vision config use_qk_norm=true is not supported")
    if not getattr(vc, "attention_bias", True):
        raise ValueError("Janus vision config attention_bias=false is not supported")
    size, patch = vc.image_size, vc.patch_size
    if not isinstance(size, int) or not isinstance(patch, int):
        raise ValueError(f"Janus vision config: only square sizes are supported, got image_size={size!r}, "
                         f"patch_size={patch!r}")
    return SimpleNamespace(hidden_size=vc.hidden_size, num_attention_heads=vc.num_attention_heads,
                           intermediate_size=int(vc.hidden_size * vc.mlp_ratio), hidden_act=vc.hidden_act,
                           layer_norm_eps=vc.layer_norm_eps, num_hidden_layers=vc.num_hidden_layers,
                           num_channels=vc.num_channels, image_size=size, patch_size=patch)


class JanusVisionAligner(nn.Module):
    """fc1 into the decoder's width, then `depth - 1` more linears, each after the activation."""

    def __init__(self, vc: PretrainedConfig):
        super().__init__()
        self.fc1 = nn.Linear(vc.hidden_size, vc.projection_dim)
        self.hidden_layers = nn.ModuleList(nn.Linear(vc.projection_dim, vc.projection_dim)
                                           for _ in range(1, vc.depth))
        self.act = get_act_fn(vc.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        for layer in self.hidden_layers:
            x = layer(self.act(x))
        return x


class JanusForConditionalGeneration(MediaCausalLM):

    def __init__(self, config: PretrainedConfig):
        nn.Module.__init__(self)
        self.config = config
        text, vision = config.text_config, config.vision_config
        if text.model_type != "llama":
            raise ValueError(f"Janus with a {text.model_type!r} text model is not supported; supported: llama")
        if vision.projection_dim != text.hidden_size:
            raise ValueError(f"Janus aligner width {vision.projection_dim} differs from the text model's hidden size "
                             f"{text.hidden_size}")
        self.qkv_bias, self.qk_norm = False, False
        self.vision_tower = SiglipVisionTower(tower_config(vision))
        self.aligner = JanusVisionAligner(vision)
        self.model = LlamaModel(text)
        self.lm_head = ParallelLMHead(text.vocab_size, text.hidden_size)
        # transformers ties the head to the embeddings by the top-level config, and only where the checkpoint has
        # no head of its own (the converted Janus-Pro checkpoints say tied but carry one): decided at load
        self.tie_by_config = bool(getattr(config, "tie_word_embeddings", False))
        self.tied = False
        self.logits_processor = LogitsProcessor(text.vocab_size)
        self.encoder_cache = EncoderCache(_ENCODER_CACHE_BYTES)

    # ----- forward -----

    def encode(self, items: list[MultimodalItem]) -> list[torch.Tensor]:
        """Aligned features [patches, hidden] for each item, all images in one tower pass."""
        pixels = pixels_to_device([it.features["pixel_values"] for it in items], self.aligner.fc1.weight.device)
        return list(self.aligner(self.vision_tower(pixels)))

    # ----- weights -----

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """transformers' layout: "model.vision_model." (the tower), "model.aligner.", "model.language_model."
        (the decoder), "lm_head."; the image-generation tensors are skipped."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()

        def text_weights() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                if name.startswith(_GENERATION_WEIGHTS):
                    continue
                if name.startswith(("model.vision_model.", "model.aligner.")):
                    name = name.removeprefix("model.").replace("vision_model.", "vision_tower.", 1)
                    name = name.replace(".self_attn.projection_layer.", ".self_attn.out_proj.")
                    default_weight_loader(params[name], tensor)
                    loaded.add(name)
                    continue
                if name.startswith("model.language_model."):
                    name = "model." + name.removeprefix("model.language_model.")
                yield name, tensor

        loaded |= super().load_weights(text_weights())
        if self.tie_by_config and "lm_head.weight" not in loaded:
            self.lm_head.tie_to(self.model.embed_tokens)
            self.tied = True
        return loaded


EntryClass = [JanusForConditionalGeneration]
