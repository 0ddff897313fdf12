"""Phi-4-multimodal (`Phi4MultimodalForCausalLM`): a Phi-3-style decoder, a SigLIP-style tower read through
dynamic-HD crops for images, and a Conformer encoder for audio (`ConformerEncoder`).

The decoder is Llama's (`models/llama.py`) with rotary on the first `partial_rotary_factor` of each head; its
checkpoint stores q/k/v and gate/up already fused, which `load_weights` splits into our merged layers' shards.

An image is a global view plus a grid of crops, all `crop_size` pixels square (`processors/phi4_multimodal.py`).
Every crop goes through the tower's blocks up to `feature_layer`, as transformers runs it: a crop's padding patches
take position 0 and are never attended to, while the other patches' positions are spread over the whole position
table in proportion to the crop's unpadded extent. The crop's features are average-pooled 2x2; the crops' pooled
grids are laid side by side, cut to their unpadded part, a learned separator column closes each row, then come a
learned separator, and the global view's grid with its separator column; two linear maps with an exact GELU between
project the rows to the decoder's width.

An audio clip's encoder rows go through one of two projection pairs: the vision-speech pair when the prompt also
has an image, else the speech pair (the processor side marks which, `processors/phi4_multimodal.py`).

LongRoPE (the hub's 128k context) is served per position (`longrope_rotary`): equal to transformers while a
sequence stays within `original_max_position_embeddings` (4096 on the hub), not past it.

Refused: folders and checkpoints that carry the hub's vision/speech LoRA adapters (`refuse_lora_folders`; merge
the one wanted into the base weights first).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from mmserve.layers.activation import get_act_fn
from mmserve.layers.linear import default_weight_loader
from mmserve.layers.rotary import RotaryEmbedding, rope_parameters
from mmserve.layers.vision import pixels_to_device
from mmserve.models.clip import CLIPAttention, CLIPEncoderLayer, hidden_state_indices
from mmserve.models.llama import head_dim_of
from mmserve.models.media_lm import MediaCausalLM
from mmserve.models.siglip import SiglipEncoder, SiglipVisionEmbeddings
from mmserve.multimodal.encoder_cache import EncoderCache
from mmserve.multimodal.inputs import MultimodalItem
from mmserve.multimodal.processors.phi4_multimodal import crop_grid, useful_grid

_ENCODER_CACHE_BYTES = 512 << 20


def _masked_attention(attn: CLIPAttention, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """[crops, patches, dim] self-attention in which no patch attends to a padding patch (key_mask False), while
    padding patches still attend to the others (their outputs reach the pooled features at a crop's edge)."""
    crops, patches, _ = x.shape
    q, k, v = (proj(x).view(crops, patches, attn.num_heads, attn.head_dim).transpose(1, 2)
               for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :], scale=attn.scale)
    return attn.out_proj(out.transpose(1, 2).reshape(crops, patches, -1))


def _block(layer: CLIPEncoderLayer, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    x = x + _masked_attention(layer.self_attn, layer.layer_norm1(x), key_mask)
    return x + layer.mlp(layer.layer_norm2(x))


class Phi4VisionTower(nn.Module):
    """The hidden state at `feature_layer` of crops [crops, 3, crop, crop] with their patch masks [crops, p, p]:
    [crops, p * p, hidden]. Blocks past that layer, the final norm and the pooling head are not built."""

    def __init__(self, vc: PretrainedConfig):
        super().__init__()
        self.embeddings = SiglipVisionEmbeddings(vc)
        self.patch_size = vc.patch_size
        self.table_side = vc.image_size // vc.patch_size
        depth = hidden_state_indices(vc.feature_layer, vc.num_hidden_layers)[0]
        self.encoder = SiglipEncoder(vc, depth)

    def positions(self, mask: torch.Tensor) -> torch.Tensor:
        """[crops, p * p] position ids: each unpadded patch's fractional place in its crop's unpadded extent,
        bucketed into the table's rows and columns; padding patches take 0 (float32, as transformers buckets)."""
        crops, rows, cols = mask.shape
        device = mask.device
        bounds = torch.arange(1 / self.table_side, 1.0, 1 / self.table_side, device=device)
        step_h = 1.0 / mask[:, :, 0].sum(dim=1)
        step_w = 1.0 / mask[:, 0, :].sum(dim=1)
        frac_h = (torch.arange(rows, device=device, dtype=torch.float32)[None] * step_h[:, None]).clamp(max=1 - 1e-6)
        frac_w = (torch.arange(cols, device=device, dtype=torch.float32)[None] * step_w[:, None]).clamp(max=1 - 1e-6)
        ids = (torch.bucketize(frac_h, bounds, right=True)[:, :, None] * self.table_side
               + torch.bucketize(frac_w, bounds, right=True)[:, None, :]).reshape(crops, -1)
        return torch.where(mask.reshape(crops, -1), ids, torch.zeros_like(ids))

    def forward(self, pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        emb = self.embeddings.patch_embedding
        x = emb(pixels.to(emb.weight.dtype)).flatten(2).transpose(1, 2)
        x = x + self.embeddings.position_embedding(self.positions(mask))
        key_mask = mask.reshape(mask.shape[0], -1)
        for layer in self.encoder.layers:
            x = _block(layer, x, key_mask)
        return x


class Phi4ImageEmbedding(nn.Module):
    """Crops' tower states -> each image's rows [placeholder tokens, hidden] (module docstring)."""

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        vc = config.vision_config
        self.crop_size = vc.crop_size
        self.img_processor = Phi4VisionTower(vc)
        self.img_projection_up = nn.Linear(vc.hidden_size, config.hidden_size)
        self.img_projection_down = nn.Linear(config.hidden_size, config.hidden_size)
        self.global_img_feature_extensor = nn.Parameter(torch.zeros(1, 1, vc.hidden_size))
        self.sub_img_feature_extensor = nn.Parameter(torch.zeros(1, 1, 1, vc.hidden_size))

    def pooled(self, states: torch.Tensor) -> torch.Tensor:
        """[crops, p * p, dim] -> [crops, side, side, dim], 2x2 average pools (a side of odd p reflect-padded)."""
        crops, patches, dim = states.shape
        p = int(patches**0.5)
        grid = states.view(crops, p, p, dim).permute(0, 3, 1, 2)
        if p % 2:
            grid = F.pad(grid, (0, 1, 0, 1), mode="reflect")
        return F.avg_pool2d(grid, 2).permute(0, 2, 3, 1)

    def _rows(self, pooled: torch.Tensor, mask: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
        rows, cols = crop_grid(size, self.crop_size)
        side, dim = pooled.shape[1], pooled.shape[-1]
        glob = torch.cat([pooled[0], self.sub_img_feature_extensor[0].expand(side, 1, dim)], dim=1)
        sub = pooled[1:1 + rows * cols].reshape(rows, cols, side, side, dim).transpose(1, 2)
        sub = sub.reshape(rows * side, cols * side, dim)
        useful_h, useful_w = useful_grid(mask[1:1 + rows * cols], (rows, cols))
        sub = torch.cat([sub[:useful_h, :useful_w], self.sub_img_feature_extensor[0].expand(useful_h, 1, dim)], dim=1)
        return torch.cat([sub.reshape(-1, dim), self.global_img_feature_extensor[0], glob.reshape(-1, dim)])

    def forward(self, items: list[MultimodalItem]) -> list[torch.Tensor]:
        device = self.img_projection_up.weight.device
        pixels = pixels_to_device([it.features["image_pixel_values"] for it in items], device)
        masks = torch.cat([it.features["image_attention_mask"] for it in items]).to(device=device, dtype=torch.bool)
        pooled = self.pooled(self.img_processor(pixels, masks))
        out, start = [], 0
        for item in items:
            crops = item.features["image_pixel_values"].shape[0]
            rows = self._rows(pooled[start:start + crops], masks[start:start + crops], item.features["image_sizes"])
            out.append(self.img_projection_down(F.gelu(self.img_projection_up(rows))))
            start += crops
        return out


# ----- audio -----

class ConformerFeedForward(nn.Module):
    """LayerNorm, then a gated MLP whose first half is the value and second half the gate (biased)."""

    def __init__(self, ac: PretrainedConfig):
        super().__init__()
        self.layer_norm = nn.LayerNorm(ac.hidden_size)
        self.gate_up_proj = nn.Linear(ac.hidden_size, 2 * ac.intermediate_size)
        self.down_proj = nn.Linear(ac.intermediate_size, ac.hidden_size)
        self.act = get_act_fn(ac.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, gate = self.gate_up_proj(self.layer_norm(x)).chunk(2, dim=-1)
        return self.down_proj(up * self.act(gate))


class ConformerGlu(nn.Module):
    """A pointwise convolution to two halves: (first + b1) * act(second + b2)."""

    def __init__(self, ac: PretrainedConfig):
        super().__init__()
        self.out = ac.ext_pw_out_channel
        self.ext_pw_conv_1d = nn.Conv1d(ac.hidden_size, 2 * self.out, 1)
        self.b1 = nn.Parameter(torch.zeros(1, self.out, 1))
        self.b2 = nn.Parameter(torch.zeros(1, self.out, 1))
        self.act = get_act_fn(ac.conv_glu_type)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.ext_pw_conv_1d(x).split(self.out, dim=1)
        return (value + self.b1) * self.act(gate + self.b2)


class DepthwiseSeparableConv(nn.Module):
    def __init__(self, ac: PretrainedConfig):
        super().__init__()
        channels = ac.hidden_size * ac.depthwise_multiplier
        self.dw_conv = nn.Conv1d(ac.hidden_size, channels, ac.kernel_size, padding=ac.kernel_size - 1,
                                 groups=ac.hidden_size)
        self.pw_conv = nn.Conv1d(channels, ac.depthwise_separable_out_channel, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw_conv(self.dw_conv(x))


class ConformerConv(nn.Module):
    """[blocks, T, hidden] -> the same: GLU, then a depthwise convolution that sees only the past (padded on both
    sides, its last kernel - 1 steps cut), an activation and a pointwise convolution, over time."""

    def __init__(self, ac: PretrainedConfig):
        super().__init__()
        self.cut = ac.kernel_size - 1
        self.layer_norm = nn.LayerNorm(ac.hidden_size)
        self.glu = ConformerGlu(ac)
        self.dw_sep_conv_1d = DepthwiseSeparableConv(ac)
        self.act = get_act_fn(ac.conv_activation)
        self.ext_pw_conv_1d = nn.Conv1d(ac.hidden_size, ac.ext_pw_out_channel, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dw_sep_conv_1d(self.glu(self.layer_norm(x).transpose(1, 2)))
        if self.cut:
            x = x[:, :, :-self.cut]
        return self.ext_pw_conv_1d(self.act(x)).transpose(1, 2)


class ConformerLayer(nn.Module):
    """Half a feed-forward, attention (CLIP's projections; the score bias comes from the encoder), the convolution
    module, the other half feed-forward, then a LayerNorm."""

    def __init__(self, ac: PretrainedConfig):
        super().__init__()
        self.feed_forward_in = ConformerFeedForward(ac)
        self.self_attn = CLIPAttention(ac.hidden_size, ac.num_attention_heads)
        self.conv = ConformerConv(ac)
        self.feed_forward_out = ConformerFeedForward(ac)
        self.layer_norm_att = nn.LayerNorm(ac.hidden_size)
        self.layer_norm = nn.LayerNorm(ac.hidden_size)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x + 0.5 * self.feed_forward_in(x)
        attn = self.self_attn
        h = self.layer_norm_att(x)
        blocks, steps, _ = h.shape
        q, k, v = (proj(h).view(blocks, steps, attn.num_heads, attn.head_dim).transpose(1, 2)
                   for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)
        x = x + attn.out_proj(out.transpose(1, 2).reshape(blocks, steps, -1))
        x = x + self.conv(x)
        return self.layer_norm(x + 0.5 * self.feed_forward_out(x))


class NemoSubsampling(nn.Module):
    """[1, frames, mel] -> [1, ceil(frames / time_reduction), hidden]: a stride-2 convolution, then (depthwise
    stride-2, pointwise) pairs, each followed by ReLU, over (time, mel); the channels x mel columns projected."""

    def __init__(self, ac: PretrainedConfig):
        super().__init__()
        if ac.nemo_activation != "relu":
            raise ValueError(f"Phi-4-multimodal audio with nemo_activation {ac.nemo_activation!r} is not supported")
        channels = ac.nemo_conv_channels
        layers: list[nn.Module] = [nn.Conv2d(1, channels, 3, 2, padding=1), nn.ReLU()]
        for _ in range(int(math.log2(ac.time_reduction)) - 1):
            layers += [nn.Conv2d(channels, channels, 3, 2, padding=1, groups=channels),
                       nn.Conv2d(channels, channels, 1), nn.ReLU()]
        self.conv = nn.Sequential(*layers)
        self.out = nn.Linear(channels * ac.nemo_final_size, ac.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x.unsqueeze(1))
        return self.out(x.transpose(1, 2).flatten(2))


class ConformerEncoder(nn.Module):
    """One clip's log-mel frames [frames, mel] -> [ceil(frames / time_reduction), hidden].

    As transformers runs a clip alone: frames normalised by the global mean and inverse deviation, subsampled, then
    cut into blocks of at most `max_block` steps (the last zero-padded) that the layers see apart. Attention scores
    get a learned relative-position bias per head plus the streaming mask *added as a number* (1 where a step may
    see another: its chunk and `left_chunk` chunks before it; 0 elsewhere), which is how transformers applies it,
    so it does not block anything; padding steps are not masked either (one clip has no mask in transformers)."""

    max_block = 500  # transformers' fixed block length (the reach of the original absolute positions)

    def __init__(self, ac: PretrainedConfig):
        super().__init__()
        self.time_reduction, self.chunk_size, self.left_chunk = ac.time_reduction, ac.chunk_size, ac.left_chunk
        self.max_distance, self.symmetric = ac.bias_max_distance, ac.bias_symmetric
        self.global_mean = nn.Parameter(torch.zeros(ac.input_size), requires_grad=False)
        self.global_invstd = nn.Parameter(torch.ones(ac.input_size), requires_grad=False)
        self.embed = NemoSubsampling(ac)
        buckets = ac.bias_max_distance * (1 if ac.bias_symmetric else 2)
        self.bias_values = nn.Embedding(buckets, ac.num_attention_heads)
        self.encoders = nn.ModuleList(ConformerLayer(ac) for _ in range(ac.num_blocks))

    def score_bias(self, steps: int, device: torch.device) -> torch.Tensor:
        """[1, heads, steps, steps]: the relative-position bias plus the streaming mask as 1.0 / 0.0."""
        pos = torch.arange(steps, device=device)
        rel = (pos[None, :] - pos[:, None]).clamp(-self.max_distance, self.max_distance - 1)
        bias = self.bias_values(rel.abs() if self.symmetric else rel + self.max_distance).permute(2, 0, 1)
        if self.chunk_size > 0:
            chunk = pos // self.chunk_size
            lo = (chunk - self.left_chunk).clamp(min=0) * self.chunk_size
            hi = ((chunk + 1) * self.chunk_size).clamp(max=steps)
            seen = (pos[None, :] >= lo[:, None]) & (pos[None, :] < hi[:, None])
        else:
            seen = torch.ones(steps, steps, dtype=torch.bool, device=device)
        return (seen.to(bias.dtype) + bias).unsqueeze(0)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = self.embed(((frames - self.global_mean) * self.global_invstd).unsqueeze(0))[0]
        steps = x.shape[0]
        block = min(steps, self.max_block)
        blocks = -(-steps // block)
        x = F.pad(x, (0, 0, 0, blocks * block - steps)).view(blocks, block, -1)
        bias = self.score_bias(block, x.device)
        for layer in self.encoders:
            x = layer(x, bias)
        return x.reshape(blocks * block, -1)[:steps]


class Phi4AudioEmbedding(nn.Module):
    """Each clip encoded on its own, then up-projected, GELU, down-projected: by the speech pair, or by the
    vision-speech pair for a clip in a prompt with images (`beside_images`), as transformers picks per call."""

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        ac = config.audio_config
        self.encoder = ConformerEncoder(ac)
        self.up_proj_for_speech = nn.Linear(ac.hidden_size, config.hidden_size)
        self.down_proj_for_speech = nn.Linear(config.hidden_size, config.hidden_size)
        self.up_proj_for_vision_speech = nn.Linear(ac.hidden_size, config.hidden_size)
        self.down_proj_for_vision_speech = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, items: list[MultimodalItem]) -> list[torch.Tensor]:
        device = self.up_proj_for_speech.weight.device
        out = []
        for item in items:
            frames = item.features["audio_input_features"].to(device=device, dtype=self.up_proj_for_speech.weight.dtype)
            states = self.encoder(frames)
            if bool(item.features["beside_images"]):
                up, down = self.up_proj_for_vision_speech, self.down_proj_for_vision_speech
            else:
                up, down = self.up_proj_for_speech, self.down_proj_for_speech
            out.append(down(F.gelu(up(states))))
        return out


def longrope_rotary(config: PretrainedConfig) -> RotaryEmbedding:
    """LongRoPE's table: positions below `original_max_position_embeddings` turn with the short factors, the rest
    with the long ones, all scaled by the attention factor (given, or sqrt(1 + ln s / ln original) for the
    context's stretch s). transformers picks one set for the whole sequence by its length (and re-encodes the
    sequence when it outgrows the original context), so the two agree while a sequence stays within it."""
    params = rope_parameters(config)
    original = params.get("original_max_position_embeddings") or config.original_max_position_embeddings
    longest = config.max_position_embeddings
    rotary = RotaryEmbedding(head_dim_of(config), longest, {**params, "rope_type": "default"})
    factor = params.get("factor") or longest / original
    scale = params.get("attention_factor") or (math.sqrt(1 + math.log(factor) / math.log(original))
                                               if factor > 1 else 1.0)
    dim = rotary.rotary_dim
    powers = params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    for lo, hi, key in ((0, min(original, longest), "short_factor"), (original, longest, "long_factor")):
        inv_freq = 1.0 / (torch.tensor(params[key], dtype=torch.float32) * powers)
        freqs = torch.outer(torch.arange(lo, hi, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        rotary.cos_cache[lo:hi] = emb.cos() * scale
        rotary.sin_cache[lo:hi] = emb.sin() * scale
    return rotary


def refuse_lora_folders(config: PretrainedConfig) -> None:
    """The hub's folder carries PEFT adapters beside the weights (`vision-lora/`, `speech-lora/`), each meant for
    prompts of its modality; transformers' native class applies none unless asked (`load_adapter`), and one merged
    set cannot serve both, so a folder that has them is refused rather than served without them unsaid."""
    folder = Path(getattr(config, "_name_or_path", "") or "")
    adapters = sorted(p.parent.name for p in folder.glob("*/adapter_config.json")) if folder.is_dir() else []
    if adapters:
        raise ValueError(f"{folder} carries LoRA adapters ({', '.join(adapters)}) that Phi4MultimodalForCausalLM "
                         "does not apply: merge the one for the modality served into the base weights and save "
                         "that model (peft's merge_and_unload), or move the adapter folders away to serve the base "
                         "model as transformers' native class runs it")


class Phi4MultimodalForCausalLM(MediaCausalLM):
    def __init__(self, config: PretrainedConfig):
        refuse_lora_folders(config)
        longrope = rope_parameters(config)["rope_type"] == "longrope"
        if longrope:  # the decoder is built with plain rotary, then given LongRoPE's table
            plain = copy.copy(config)
            plain.rope_parameters = {**rope_parameters(config), "rope_type": "default"}
            super().__init__(plain)
            self.config = config
            rotary = longrope_rotary(config)
            for layer in self.model.layers:
                layer.self_attn.rotary_emb = rotary
        else:
            super().__init__(config)
        self.image_embed = Phi4ImageEmbedding(config)
        self.audio_embed = Phi4AudioEmbedding(config)
        self.encoder_cache = EncoderCache(_ENCODER_CACHE_BYTES)

    def encode(self, items: list[MultimodalItem]) -> list[torch.Tensor]:
        """Rows [placeholder tokens, hidden] per item: the images' crops through the tower in one pass, each
        audio clip through the Conformer on its own."""
        out: list[torch.Tensor | None] = [None] * len(items)
        for modality, embed in (("image", self.image_embed), ("audio", self.audio_embed)):
            chosen = [i for i, it in enumerate(items) if it.modality == modality]
            if chosen:
                for i, rows in zip(chosen, embed([items[i] for i in chosen]), strict=True):
                    out[i] = rows
        return out  # type: ignore[return-value]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """transformers' names: the decoder's fused `qkv_proj` and `gate_up_proj` split into their parts; the image
        and audio embeddings under "model.embed_tokens_extend." by name (the tower's blocks past `feature_layer`,
        its final norm and pooling head skipped; the Conformer's attention output named as CLIP's)."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        config, head_dim = self.config, head_dim_of(self.config)
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        sizes = [config.num_attention_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]

        def decoder() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                if ".base_layer." in name or "lora_" in name:
                    raise ValueError(f"the checkpoint carries LoRA adapters ({name!r}), which transformers' "
                                     "Phi4MultimodalForCausalLM does not apply either; merge the vision or speech "
                                     "adapter into the base weights and save the merged model")
                if name.startswith("model.embed_tokens_extend."):
                    name = name.removeprefix("model.embed_tokens_extend.")
                    name = name.replace(".self_attn.o_proj.", ".self_attn.out_proj.").replace(
                        ".relative_attention_bias_layer.", ".").replace(".encoder_embedding.", ".")
                    if name in params:
                        default_weight_loader(params[name], tensor)
                        loaded.add(name)
                    elif not name.startswith("image_embed.img_processor."):
                        raise KeyError(f"checkpoint tensor {name!r} has no parameter in {type(self).__name__}")
                    continue
                if name.endswith("self_attn.qkv_proj.weight"):
                    for part, shard in zip(tensor.split(sizes), ("q_proj", "k_proj", "v_proj"), strict=True):
                        yield name.replace("qkv_proj", shard), part
                elif name.endswith("mlp.gate_up_proj.weight"):
                    for part, shard in zip(tensor.chunk(2), ("gate_proj", "up_proj"), strict=True):
                        yield name.replace("gate_up_proj", shard), part
                else:
                    yield name, tensor

        return loaded | super().load_weights(decoder())


EntryClass = [Phi4MultimodalForCausalLM]
