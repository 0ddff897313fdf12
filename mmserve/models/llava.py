"""LLaVA 1.5: a CLIP tower whose chosen hidden layers (`vision_feature_layer`, without the class token under the
"default" `vision_feature_select_strategy`) go through a 2-layer projector into the embedding rows of the image's
placeholder tokens, ahead of a text decoder (Llama, Mistral or Qwen2, by the text config's model_type).

Every image is cropped to the tower's size by the processor, so each one is a fixed number of tokens (the processor
side: `multimodal/processors/llava.py`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn
from transformers import PretrainedConfig

from mmserve.layers.activation import get_act_fn
from mmserve.layers.embedding import ParallelLMHead
from mmserve.layers.linear import default_weight_loader
from mmserve.layers.logits import LogitsProcessor
from mmserve.layers.vision import pixels_to_device
from mmserve.models.clip import CLIPVisionTower, hidden_state_indices
from mmserve.models.llama import LlamaForCausalLM, LlamaModel
from mmserve.models.media_lm import MediaCausalLM
from mmserve.models.mistral import MistralForCausalLM
from mmserve.models.pixtral import PixtralVisionTower, encode_pixtral_images
from mmserve.models.qwen2 import Qwen2ForCausalLM
from mmserve.multimodal.encoder_cache import EncoderCache
from mmserve.multimodal.inputs import MultimodalItem

_ENCODER_CACHE_BYTES = 512 << 20
# text_config.model_type -> the text family whose switches (q/k/v bias, q/k norm) the decoder takes
_BACKBONES: dict[str, type[LlamaForCausalLM]] = {
    "llama": LlamaForCausalLM, "mistral": MistralForCausalLM, "qwen2": Qwen2ForCausalLM}


class LlavaMultiModalProjector(nn.Module):
    def __init__(self, config: PretrainedConfig, in_dim: int):
        super().__init__()
        hidden, bias = config.text_config.hidden_size, getattr(config, "multimodal_projector_bias", True)
        self.linear_1 = nn.Linear(in_dim, hidden, bias=bias)
        self.act = get_act_fn(config.projector_hidden_act)
        self.linear_2 = nn.Linear(hidden, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaForConditionalGeneration(MediaCausalLM):
    # checkpoint names (after the layout is normalised) loaded as they are, not through the decoder's mapping
    direct_weights: tuple[str, ...] = ("vision_tower.", "multi_modal_projector.")

    def __init__(self, config: PretrainedConfig):
        nn.Module.__init__(self)
        self.config = config
        text, vision = config.text_config, config.vision_config
        backbone = _BACKBONES.get(text.model_type)
        if backbone is None:
            raise ValueError(f"LLaVA with a {text.model_type!r} text model is not supported; "
                             f"supported: {', '.join(sorted(_BACKBONES))}")
        self.qkv_bias, self.qk_norm = backbone.qkv_bias, backbone.qk_norm
        layers = hidden_state_indices(config.vision_feature_layer, vision.num_hidden_layers)
        # Pixtral's tower (pixtral-12b) has no class token: all its features are kept
        self.pixtral = vision.model_type == "pixtral"
        if self.pixtral and config.vision_feature_select_strategy != "full":
            raise ValueError(f"LLaVA with a Pixtral tower and vision_feature_select_strategy "
                             f"{config.vision_feature_select_strategy!r} is not supported (only 'full')")
        self.keep_class_token = config.vision_feature_select_strategy == "full"
        self.vision_tower = self.build_vision_tower(vision, layers)
        self.multi_modal_projector = LlavaMultiModalProjector(config, vision.hidden_size * len(layers))
        self.model = LlamaModel(text, qkv_bias=self.qkv_bias, qk_norm=self.qk_norm)
        self.lm_head = ParallelLMHead(text.vocab_size, text.hidden_size)
        self.tied = bool(getattr(text, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False))
        if self.tied:
            self.lm_head.tie_to(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(text.vocab_size)
        self.encoder_cache = EncoderCache(_ENCODER_CACHE_BYTES)

    def build_vision_tower(self, vision: PretrainedConfig, layers: list[int]) -> nn.Module:
        """The tower returning the hidden states of `layers` (CLIP here, or Pixtral; LLaVA-OneVision's is
        SigLIP)."""
        if vision.model_type == "pixtral":
            return PixtralVisionTower(vision, layers)
        return CLIPVisionTower(vision, layers)

    # ----- forward -----

    def device_pixels(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        """The items' pixels joined on the tower's device (from pinned memory: the host does not wait)."""
        return pixels_to_device(pixels, self.vision_tower.embeddings.patch_embedding.weight.device)

    def vision_states(self, pixels: torch.Tensor) -> torch.Tensor:
        """[images, C, H, W] tower-sized pixels -> the selected layers' states side by side [images, tokens, dim]."""
        states = self.vision_tower(pixels.to(self.vision_tower.embeddings.patch_embedding.weight.device))
        if not self.keep_class_token:
            states = [s[:, 1:] for s in states]
        return torch.cat(states, dim=-1)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[images, C, H, W] tower-sized pixels -> projected features [images, tokens, hidden], in one tower pass."""
        return self.multi_modal_projector(self.vision_states(pixels))

    def encode(self, items: list[MultimodalItem]) -> list[torch.Tensor]:
        """Projected image features [placeholder tokens, hidden] for each item."""
        if self.pixtral:  # each image its own size; its span holds the rows' break tokens too
            return encode_pixtral_images(items, self.vision_tower, self._project_pixtral, self.model.embed_tokens)
        return list(self.image_features(self.device_pixels([it.features["pixel_values"] for it in items])))

    def _project_pixtral(self, states: torch.Tensor, grids: list[tuple[int, int]]) -> list[torch.Tensor]:
        features = self.multi_modal_projector(states)
        return [f.view(rows, cols, -1) for f, (rows, cols) in
                zip(features.split([rows * cols for rows, cols in grids]), grids, strict=True)]

    # ----- weights -----

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Accepts the original llava-hf layout ("language_model.model.", "language_model.lm_head.",
        "vision_tower.vision_model.") and transformers 5's ("model.language_model.", "lm_head.",
        "model.vision_tower."). The tower and projector load by name; the decoder as its text family does."""
        return load_split_weights(self, weights)


def split_weight_names(weights: Iterable[tuple[str, torch.Tensor]],
                       direct: tuple[str, ...]) -> Iterator[tuple[bool, str, torch.Tensor]]:
    """(whether the tensor is under one of `direct`'s prefixes, its name in our model, the tensor) for a
    vision-language checkpoint in the llava-hf layout ("language_model.model.", "language_model.lm_head.", the tower's
    and projector's prefixes, a CLIP or SigLIP tower under "vision_tower.vision_model.") or transformers 5's
    ("model.language_model.", "lm_head.", "model." before the others). The rest are named as the model's decoder
    loads them."""
    for name, tensor in weights:
        if name.startswith(tuple("model." + prefix for prefix in (*direct, "language_model."))):
            name = name.removeprefix("model.")
        name = name.replace("vision_tower.vision_model.", "vision_tower.", 1)
        if name.startswith(direct):
            yield True, name, tensor
            continue
        if name.startswith(("language_model.lm_head.", "language_model.model.")):
            name = name.removeprefix("language_model.")
        elif name.startswith("language_model."):
            name = "model." + name.removeprefix("language_model.")
        yield False, name, tensor


def load_split_weights(model: LlamaForCausalLM, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
    """Weights of a vision-language model in either layout (`split_weight_names`): names under the model's
    `direct_weights` load as they are (those it has no parameter for are skipped: a pooled head, blocks past the
    deepest feature layer), the rest as its Llama-family decoder loads them."""
    params = dict(model.named_parameters())
    loaded: set[str] = set()

    def text_weights() -> Iterable[tuple[str, torch.Tensor]]:
        for direct, name, tensor in split_weight_names(weights, model.direct_weights):
            if not direct:
                yield name, tensor
            elif name in params:
                default_weight_loader(params[name], tensor)
                loaded.add(name)

    return loaded | LlamaForCausalLM.load_weights(model, text_weights())


EntryClass = [LlavaForConditionalGeneration]
