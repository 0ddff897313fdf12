"""Qwen2-VL: a ViT with 2-D rotary over 14x14 patches (pairs of frames for video), a patch merger that turns each
2x2 block of patches into one LLM token, and the Qwen2 decoder with 3-D (M-RoPE) positions.

The processor side (cutting the HF processor output into one MultimodalItem per image/video and computing the
prompt's M-RoPE positions) is `multimodal/processors/qwen_vl.py`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn
from transformers import PretrainedConfig

from mmserve.layers.embedding import ParallelLMHead
from mmserve.layers.logits import LogitsProcessor
from mmserve.layers.vision import (
    Grid,
    PackedSeqs,
    PatchEmbed,
    VisionBlock,
    VisionGraphRunner,
    VisionMLP,
    VisionPlan,
    VisionRotary,
    frame_lengths,
    host_grids,
    patch_positions,
    pixels_to_device,
    vision_patch_buckets,
)
from mmserve.models.llama import LlamaModel
from mmserve.models.media_lm import MediaCausalLM
from mmserve.multimodal.encoder_cache import EncoderCache
from mmserve.multimodal.inputs import MultimodalItem

_ENCODER_CACHE_BYTES = 512 << 20


class PatchMerger(nn.Module):
    """Concatenates each merge x merge block of patch features and projects it to the LLM width."""

    def __init__(self, out_dim: int, dim: int, merge: int):
        super().__init__()
        self.in_dim = dim * merge * merge
        self.ln_q = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.in_dim, self.in_dim), nn.GELU(), nn.Linear(self.in_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.in_dim))


class Qwen2VisionTransformer(nn.Module):
    def __init__(self, vc: PretrainedConfig):
        super().__init__()
        self.merge = vc.spatial_merge_size
        self.patch_embed = PatchEmbed(vc.in_channels * vc.temporal_patch_size * vc.patch_size**2, vc.embed_dim)
        theta = (getattr(vc, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        self.rotary = VisionRotary(vc.embed_dim // vc.num_heads, theta)
        mlp_dim = int(vc.embed_dim * vc.mlp_ratio)
        self.blocks = nn.ModuleList(
            VisionBlock(vc.embed_dim, vc.num_heads, VisionMLP(vc.embed_dim, mlp_dim, vc.hidden_act))
            for _ in range(vc.depth))
        self.merger = PatchMerger(vc.hidden_size, vc.embed_dim, self.merge)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Merged features [tokens, hidden] of all items (grid_thw [items, 3] on the host), in the processor's
        order; attention runs within each frame (pair) of each item."""
        plan = self.plan(host_grids(grid_thw))
        return self.run(pixel_values, *plan.to_device(self.patch_embed.proj.weight.device))

    def plan(self, grids: Sequence[Grid]) -> VisionPlan:
        """Each patch's (row, column), and the frames as the sequences of attention."""
        return VisionPlan({"positions": patch_positions(grids, self.merge)}, {"frames": frame_lengths(grids)})

    def max_seqlens(self, patches: int) -> dict[str, int]:
        """Bounds on the sequences of each packing in a call of `patches` patches (a CUDA graph's `max_seqlen`)."""
        return {"frames": patches}

    def run(self, pixel_values: torch.Tensor, tensors: dict[str, torch.Tensor],
            seqs: dict[str, PackedSeqs]) -> torch.Tensor:
        """The tower over a plan on the device (what a CUDA graph captures)."""
        x = self.patch_embed(pixel_values)
        rotary = self.rotary(tensors["positions"])
        for block in self.blocks:
            x = block(x, rotary, seqs["frames"])
        return self.merger(x)


class Qwen2VLForConditionalGeneration(MediaCausalLM):
    qkv_bias = True
    uses_mrope = True
    vision_tower: type[nn.Module] = Qwen2VisionTransformer  # Qwen2.5-VL swaps in its windowed ViT

    def __init__(self, config: PretrainedConfig):
        nn.Module.__init__(self)
        self.config = config
        text = config.text_config
        self.visual = self.vision_tower(config.vision_config)
        self.model = LlamaModel(text, qkv_bias=True)
        self._build_head(config, text)

    def _build_head(self, config: PretrainedConfig, text: PretrainedConfig) -> None:
        """LM head (tied to the embedding when either config says so), logits, and the encoder cache; needs
        self.model built first."""
        self.lm_head = ParallelLMHead(text.vocab_size, text.hidden_size)
        self.tied = bool(getattr(text, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False))
        if self.tied:
            self.lm_head.tie_to(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(text.vocab_size)
        self.encoder_cache = EncoderCache(_ENCODER_CACHE_BYTES)
        self.vision_graphs: VisionGraphRunner | None = None  # `capture_vision_graphs` on a GPU

    # ----- forward -----

    def encode(self, items: list[MultimodalItem]) -> list[torch.Tensor]:
        """Vision-tower outputs [placeholder tokens, hidden] for each item, in one batched forward: replayed from
        the tower's CUDA graphs when the step's patches fit a bucket, else eager."""
        # The grids stay on the host, where the processor made them; only --keep-mm-feature-on-device moves them
        # to the GPU, and then this is one small copy back before the tower starts.
        grids = torch.cat([it.features["grid_thw"] for it in items]).cpu()
        merged = None
        if self.vision_graphs is not None:
            merged = self.vision_graphs.run([it.features["pixel_values"] for it in items], host_grids(grids))
        if merged is None:
            device = self.visual.patch_embed.proj.weight.device
            pixels = pixels_to_device([it.features["pixel_values"] for it in items], device)
            merged = self.visual(pixels, grids)
        return list(merged.split([it.length for it in items]))

    def capture_vision_graphs(self, pool, stream: torch.cuda.Stream | None, max_patches: int,
                              use_graphs: bool = True) -> VisionGraphRunner | None:
        """Capture the tower's CUDA graphs for calls of up to `max_patches` patches (`use_graphs=False`: the
        padded buffers without graphs, the CPU tests); `encode` replays them from then on. None for a tower that
        does not plan its calls apart from running them (Qwen3-VL's, whose learned position embeddings and
        DeepStack outputs stay eager: its image steps run the language model eagerly too)."""
        if not hasattr(self.visual, "plan"):
            return None
        graphs = VisionGraphRunner(self.visual, vision_patch_buckets(max_patches), use_graphs)
        graphs.capture(pool, stream)
        self.vision_graphs = graphs
        return graphs

    @torch.inference_mode()
    def warm_up_encoder(self) -> None:
        """The tower once over random pixels of two small images, 16 and 12 patches: Triton specialises integer
        arguments on divisibility by 16, so without this the first user image of the other kind compiled kernels
        on its time to first token (374 ms on an H100)."""
        merge = self.config.vision_config.spatial_merge_size
        weight = self.visual.patch_embed.proj.weight
        items = []
        for h, w in ((2 * merge, 2 * merge), (merge, 3 * merge)):
            patches = h * w
            pixels = torch.randn(patches, weight.shape[1], device=weight.device, dtype=weight.dtype)
            items.append(MultimodalItem("image", {"pixel_values": pixels, "grid_thw": torch.tensor([[1, h, w]])}, 0,
                                        patches // merge**2))
        for item in items:  # eagerly, past any graphs: the eager path serves steps larger than the graphs
            self.visual(item.features["pixel_values"], item.features["grid_thw"])

    # ----- weights -----

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Accepts both layouts: transformers 5 ("model.visual.", "model.language_model.") and the original
        checkpoints ("visual.", "model."). The tower's parameters load as the decoder's do (by name, merged ones by
        `packed_modules`, reshaping ones by their `weight_loader`)."""
        def renamed() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                if name.startswith("model.visual."):
                    name = name.removeprefix("model.")
                elif name.startswith("model.language_model."):
                    name = "model." + name.removeprefix("model.language_model.")
                if name.startswith("visual.") and "rotary" in name:  # recomputed, not loaded
                    continue
                yield name, tensor

        return super().load_weights(renamed())


EntryClass = [Qwen2VLForConditionalGeneration]
