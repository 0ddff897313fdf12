"""Qwen3-Omni, the thinker (text out): Qwen3-VL-MoE (`qwen3_vl.py`: ViT with DeepStack, the Qwen3-MoE decoder with
interleaved M-RoPE) plus a Whisper-style audio encoder. The talker and the code-to-waveform model (speech out) are
not part of it.

The audio encoder, as the reference computes it:
- a clip's log-mel frames [mel, frames] are cut into chunks of 2 * n_window frames (1 s), the last one shorter; each
  chunk goes through three stride-2 3x3 convolutions (GELU), its (channels x mel) columns are projected to the
  encoder width, and sinusoidal positions 0, 1, ... are added within the chunk; the chunks of a clip are padded to
  its longest, as the reference pads them (a padded row is not zero after the first convolution, so the padding
  shows in the next one), and only each chunk's own rows are kept;
- pre-norm blocks attend within windows of `n_window_infer // (2 * n_window)` chunks' rows, never across clips;
- a final LayerNorm, then proj1, GELU, proj2 to the LLM width.
A clip's rows are its placeholder tokens (`processors/qwen3_omni.audio_tokens`). Clips are encoded on their own:
transformers pads every clip of a call to the longest chunk of the call, so a clip shorter than one chunk encoded
beside a longer one differs there from the same clip alone (this module gives the latter, what one clip a call gives).

Audio rows carry zeros in the DeepStack columns of the encoder output, so DeepStack adds nothing to them, as the
reference adds it at visual positions only. Audio positions (`processors/qwen3_omni.py`) run on like text. A video
with its own sound (use_audio_in_video) is one item whose frames go through the ViT and whose sound goes through the
audio tower alone, their rows merged by time as the processor side laid the tokens out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from mmserve.layers.activation import get_act_fn
from mmserve.layers.vision import PackedSeqs, copy_to_device, cu_seqlens
from mmserve.models.clip import CLIPAttention
from mmserve.models.qwen3_moe import qwen_moe_mlp
from mmserve.models.qwen3_vl import Qwen3VLForConditionalGeneration
from mmserve.multimodal.inputs import MultimodalItem
from mmserve.multimodal.processors.qwen3_omni import audio_tokens


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's fixed positions [length, channels]: sines then cosines over geometric timescales."""
    increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-increment * torch.arange(channels // 2).float())
    scaled = torch.arange(length)[:, None] * inv_timescales[None, :]
    return torch.cat([scaled.sin(), scaled.cos()], dim=1)


class AudioEncoderLayer(nn.Module):
    """Pre-norm block: attention (CLIP's, q/k/v/out projections with biases) and a GELU MLP, each with a residual."""

    def __init__(self, ac: PretrainedConfig):
        super().__init__()
        dim = ac.d_model
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.self_attn = CLIPAttention(dim, ac.encoder_attention_heads)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ac.encoder_ffn_dim)
        self.fc2 = nn.Linear(ac.encoder_ffn_dim, dim)
        self.act = get_act_fn(ac.activation_function)

    def forward(self, x: torch.Tensor, seqs: PackedSeqs) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), seqs)
        return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))


class AudioEncoder(nn.Module):
    def __init__(self, ac: PretrainedConfig):
        super().__init__()
        self.n_window = ac.n_window
        self.chunks_per_window = ac.n_window_infer // (2 * ac.n_window)
        channels = ac.downsample_hidden_size
        self.conv2d1 = nn.Conv2d(1, channels, 3, 2, padding=1)
        self.conv2d2 = nn.Conv2d(channels, channels, 3, 2, padding=1)
        self.conv2d3 = nn.Conv2d(channels, channels, 3, 2, padding=1)
        mel = ac.num_mel_bins
        for _ in range(3):
            mel = (mel + 1) // 2
        self.conv_out = nn.Linear(channels * mel, ac.d_model, bias=False)
        self.register_buffer("positions", sinusoids(ac.max_source_positions, ac.d_model), persistent=False)
        self.layers = nn.ModuleList(AudioEncoderLayer(ac) for _ in range(ac.encoder_layers))
        self.ln_post = nn.LayerNorm(ac.d_model)
        self.proj1 = nn.Linear(ac.d_model, ac.d_model)
        self.act = get_act_fn(ac.activation_function)
        self.proj2 = nn.Linear(ac.d_model, ac.output_dim)

    def _downsample(self, clip: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """One clip's [mel, frames] -> its chunks' rows [tokens, d_model] (positions added), and its windows."""
        span = 2 * self.n_window
        lengths = [min(span, clip.shape[1] - start) for start in range(0, clip.shape[1], span)]
        padded = torch.zeros(len(lengths), 1, clip.shape[0], max(lengths), dtype=self.conv2d1.weight.dtype,
                             device=self.conv2d1.weight.device)
        for i, chunk in enumerate(clip.to(padded.dtype).split(span, dim=1)):
            padded[i, 0, :, :chunk.shape[1]] = chunk
        x = F.gelu(self.conv2d3(F.gelu(self.conv2d2(F.gelu(self.conv2d1(padded))))))
        chunks, chan, mel, rows = x.shape
        x = self.conv_out(x.permute(0, 3, 1, 2).reshape(chunks, rows, chan * mel)) + self.positions[:rows].to(x.dtype)
        kept = [audio_tokens(n, self.n_window) for n in lengths]
        tokens = torch.cat([x[i, :n] for i, n in enumerate(kept)])
        window = max(kept) * self.chunks_per_window
        total = tokens.shape[0]
        return tokens, [min(window, total - start) for start in range(0, total, window)]

    def forward(self, clips: list[torch.Tensor]) -> torch.Tensor:
        """[sum of the clips' tokens, output_dim] for clips of log-mel frames [mel, frames] each."""
        parts = [self._downsample(clip) for clip in clips]
        x = torch.cat([tokens for tokens, _ in parts])
        windows = [n for _, lengths in parts for n in lengths]
        seqs = PackedSeqs(copy_to_device([cu_seqlens(windows)], x.device)[0], windows)
        for layer in self.layers:
            x = layer(x, seqs)
        return self.proj2(self.act(self.proj1(self.ln_post(x))))


class Qwen3OmniMoeThinkerForConditionalGeneration(Qwen3VLForConditionalGeneration):
    """Qwen3-VL-MoE with an audio tower; its router renormalises the top-k weights as the config says."""

    mlp_factory = staticmethod(qwen_moe_mlp)

    def __init__(self, config: PretrainedConfig):
        super().__init__(config)
        self.audio_tower = AudioEncoder(config.audio_config)

    def encode(self, items: list[MultimodalItem]) -> list[torch.Tensor]:
        """Encoder rows [tokens, hidden * (1 + DeepStack levels)] per item: vision items through the ViT, audio clips
        through the audio tower with zero DeepStack columns, and a video with its sound through both, its rows put
        where its `audio_rows` say (the frames' in order, the sound's in order)."""
        vision: list[tuple[int, MultimodalItem]] = []
        clips: list[tuple[int, torch.Tensor, int]] = []  # (item, log-mel frames, encoder rows)
        n_window = self.audio_tower.n_window
        for i, it in enumerate(items):
            if it.modality == "audio":
                clips.append((i, it.features["input_features"], it.length))
            elif "audio_rows" in it.features:
                mel = it.features["audio_features"]
                sound = audio_tokens(mel.shape[1], n_window)
                frames = {"pixel_values": it.features["pixel_values"], "grid_thw": it.features["grid_thw"]}
                vision.append((i, MultimodalItem("video", frames, 0, it.length - sound)))
                clips.append((i, mel, sound))
            else:
                vision.append((i, it))
        parts: list[list[torch.Tensor]] = [[] for _ in items]  # an item's vision rows, then its sound's
        if vision:
            for (i, _), rows in zip(vision, super().encode([it for _, it in vision]), strict=True):
                parts[i].append(rows)
        if clips:
            device = self.audio_tower.conv2d1.weight.device
            rows = self.audio_tower([mel.to(device) for _, mel, _ in clips])
            rows = F.pad(rows, (0, self.hidden_size * self.deepstack_levels))
            for (i, _, _), part in zip(clips, rows.split([n for _, _, n in clips]), strict=True):
                parts[i].append(part)
        out = []
        for it, rows in zip(items, parts, strict=True):
            if "audio_rows" not in it.features:
                out.append(rows[0])
                continue
            sound = it.features["audio_rows"].cpu()
            place = torch.cat([(~sound).nonzero().flatten(), sound.nonzero().flatten()])
            merged = rows[0].new_empty(it.length, rows[0].shape[1])
            merged[place.to(merged.device)] = torch.cat(rows)
            out.append(merged)
        return out

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The audio tower by name; the rest as Qwen3-VL's, with the Omni ViT's merger names (`ln_q`, `mlp.0`,
        `mlp.2`, `merger_list`) mapped onto ours. Both layouts: transformers 5's ("model.audio_tower.",
        "model.visual.", "model.language_model.") and the original files' ("audio_tower.", "visual.", "model.")."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        renames = (("visual.merger_list.", "visual.deepstack_merger_list."), (".ln_q.", ".norm."),
                   (".mlp.0.", ".linear_fc1."), (".mlp.2.", ".linear_fc2."))

        def rest() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                name = name.removeprefix("thinker.")
                if name.startswith("model.audio_tower."):
                    name = name.removeprefix("model.")
                if name.startswith("audio_tower."):
                    if name in params:
                        params[name].data.copy_(tensor)
                        loaded.add(name)
                        continue
                    raise KeyError(f"checkpoint tensor {name!r} has no parameter in {type(self).__name__}")
                if "visual.merger" in name:
                    for old, new in renames:
                        name = name.replace(old, new)
                yield name, tensor

        return super().load_weights(rest()) | loaded


EntryClass = [Qwen3OmniMoeThinkerForConditionalGeneration]
