"""Layers of vision towers (ViTs), shared by the model families: attention over packed sequences, 2-D rotary,
patch embedding and merge-ordered patch positions, MLPs and the pre-norm block.

A tower runs every image, video frame and attention window of a step as one packed sequence of patches: each
layer makes one attention call over all of them, bounded by `cu_seqlens` (`PackedSeqs`). Everything about the
shapes (the boundaries, the longest sequence, rotary positions, any reordering of the patches) is known on the
host from the processor's grids, so a tower computes it once per call there and moves it to the device in one
copy (`copy_to_device`); nothing inside the tower reads a device tensor back.

Attention (`varlen_attention`), one path per device:
- CUDA, half precision: torch's flash kernel in its packed (varlen) form, non-causal, over all sequences at once
  (`attention.triton_backend.flash_varlen`, which the decoder's fresh prompts use too);
- CUDA otherwise (float32, or a torch build whose flash kernel refuses the call): SDPA with a block-diagonal mask,
  built once per `PackedSeqs`;
- CPU: SDPA per sequence, as the reference does (a mask over all patches would cost quadratic memory for a long
  video, and 8x the work for windows of 64 patches in a 2k-patch image).

A tower plans a call (`plan(grids) -> VisionPlan`) and runs it (`run(pixels, tensors, seqs)`) as two steps, so
that `VisionGraphRunner` can replay the run from CUDA graphs captured by patch-count bucket: the plan is padded to
the bucket and copied into static buffers, and the launch-bound tower (32 blocks of ~12 kernels for Qwen2.5-VL)
becomes one launch.

Rotary rotates q and k in float32 and rounds once, as the reference does. On CUDA that is one Triton kernel,
in place on the qkv projection's output (`apply_vision_rotary`); the eager code is the CPU path and its reference.
The LLM's fused rotary (`fused_ops.rotary_embedding`) rounds after every product as the text models do, so it
does not serve here.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mmserve.attention.triton_backend import flash_varlen
from mmserve.layers import fused_ops
from mmserve.layers.activation import get_act_fn
from mmserve.layers.linear import default_weight_loader

Grid = tuple[int, int, int]  # (t, h, w) of an item in patches: frame (pairs), rows, columns


# ----- host-side layout -----

def host_grids(grid_thw: torch.Tensor | Sequence[Sequence[int]]) -> list[Grid]:
    """(t, h, w) of each item as Python ints. The grid comes from the processor on the host; a tower plans its
    shapes from it there, never from a device copy (reading one back would wait for the GPU)."""
    if isinstance(grid_thw, torch.Tensor):
        assert grid_thw.device.type == "cpu", "a vision tower takes its grid_thw on the host"
        grid_thw = grid_thw.tolist()
    return [(int(t), int(h), int(w)) for t, h, w in grid_thw]


def frame_lengths(grids: Sequence[Grid]) -> list[int]:
    """Patches of each frame (pair) of each item: the sequences of full attention."""
    return [h * w for t, h, w in grids for _ in range(t)]


def cu_seqlens(lengths: Sequence[int]) -> torch.Tensor:
    """[len + 1] int32 offsets of sequences packed back to back, on the host."""
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)


@functools.lru_cache(maxsize=256)
def _frame_positions(h: int, w: int, merge: int) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.int32), torch.arange(w, dtype=torch.int32),
                                indexing="ij")
    shape = (h // merge, merge, w // merge, merge)
    return torch.stack([rows.reshape(shape).transpose(1, 2).flatten(),
                        cols.reshape(shape).transpose(1, 2).flatten()], dim=-1)


def patch_positions(grids: Sequence[Grid], merge: int) -> torch.Tensor:
    """[patches, 2] int32 (row, column) of every patch on the host, in the processor's order: merge x merge blocks
    row-major, each block's patches row-major, every frame (pair) of an item alike."""
    return torch.cat([_frame_positions(h, w, merge).repeat(t, 1) for t, h, w in grids])


def copy_to_device(parts: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Host integer tensors -> int32 tensors of the same shapes on `device`, in one host-to-device copy (from
    pinned memory on CUDA, so the host does not wait for it). They are views of one buffer."""
    flat = torch.cat([p.reshape(-1).to(torch.int32) for p in parts])
    if device.type == "cuda":
        flat = flat.pin_memory()
    flat = flat.to(device, non_blocking=True)
    return [chunk.view(p.shape) for chunk, p in zip(flat.split([p.numel() for p in parts]), parts, strict=True)]


def pixels_to_device(pixels: Sequence[torch.Tensor], device: torch.device,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """The items' pixel rows (host tensors, or already on `device`) concatenated on `device`, into `out`'s first
    rows when given. On CUDA the host rows are gathered into pinned memory first: a copy from pageable memory
    would make the host wait for every kernel already queued (the step before, the running decodes) before it
    starts, where this one is queued behind them and the host goes on launching."""
    rows = sum(p.shape[0] for p in pixels)
    if out is None:
        out = torch.empty(rows, *pixels[0].shape[1:], dtype=pixels[0].dtype, device=device)
    if device.type != "cuda" or all(p.device == device for p in pixels):
        return torch.cat([p.to(device) for p in pixels], out=out[:rows])
    staged = torch.empty(rows, *pixels[0].shape[1:], dtype=pixels[0].dtype, pin_memory=True)
    torch.cat([p.cpu() for p in pixels], out=staged)
    out[:rows].copy_(staged, non_blocking=True)
    return out[:rows]


@dataclass
class PackedSeqs:
    """Sequences (images, frames or windows) packed back to back in the rows of a tensor: where each one starts
    for the attention kernels, and their lengths on the host."""

    cu_seqlens: torch.Tensor  # [n + 1] int32 offsets, on the device of the packed tensor
    lengths: list[int]  # the same on the host
    # the longest sequence, or a bound on it (a CUDA graph's, fixed per bucket); the flash kernel's grid
    max_seqlen: int | None = None
    _mask: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_seqlen is None:
            self.max_seqlen = max(self.lengths, default=0)

    @property
    def total(self) -> int:
        return sum(self.lengths)

    def block_mask(self) -> torch.Tensor:
        """[total, total] bool, True where a row and a column belong to the same sequence; built from cu_seqlens on
        its device at the first call, then kept (one tower call reuses it in every layer)."""
        if self._mask is None:
            rows = torch.arange(self.total, dtype=torch.int32, device=self.cu_seqlens.device)
            seq = torch.searchsorted(self.cu_seqlens[1:], rows, right=True)
            self._mask = seq[:, None] == seq[None, :]
        return self._mask


@dataclass
class VisionPlan:
    """A tower call's shapes, planned on the host from the grids: the integer tensors its blocks index with (each
    with one row per patch or one per merged unit, in that ratio to the patches), and for each packing of the
    patches into sequences (Qwen2-VL: frames; Qwen2.5-VL: frames and windows) the sequences' lengths."""

    tensors: dict[str, torch.Tensor]
    packings: dict[str, list[int]]

    @property
    def patches(self) -> int:
        return sum(next(iter(self.packings.values())))

    def to_device(self, device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, PackedSeqs]]:
        """The tensors and one `PackedSeqs` per packing on `device`, in one copy."""
        parts = copy_to_device([*self.tensors.values(), *map(cu_seqlens, self.packings.values())], device)
        tensors = dict(zip(self.tensors, parts, strict=False))
        cus = parts[len(tensors):]
        seqs = {name: PackedSeqs(cu, lengths) for (name, lengths), cu in zip(self.packings.items(), cus, strict=True)}
        return tensors, seqs


# ----- attention -----

def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs: PackedSeqs,
                     scale: float) -> torch.Tensor:
    """Attention within each packed sequence as one SDPA call over all rows with a block-diagonal mask."""
    mask = seqs.block_mask() if len(seqs.lengths) > 1 else None
    # 4-D, [1, heads, tokens, head_dim]: CUDA's fused kernels (memory-efficient, which takes a mask) want it so
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)[0].transpose(0, 1)


def sequence_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs: PackedSeqs,
                       scale: float) -> torch.Tensor:
    """Attention within each packed sequence, one SDPA call per sequence (the CPU path)."""
    outs = [F.scaled_dot_product_attention(qs.transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1), scale=scale)
            for qs, ks, vs in zip(q.split(seqs.lengths), k.split(seqs.lengths), v.split(seqs.lengths), strict=True)]
    return torch.cat(outs, dim=1).transpose(0, 1)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs: PackedSeqs,
                     scale: float) -> torch.Tensor:
    """[tokens, heads, head_dim] attention of q, k, v (same shapes) within each sequence of `seqs`, non-causal."""
    if not q.is_cuda:
        return sequence_attention(q, k, v, seqs, scale)
    out = flash_varlen(q, k, v, seqs.cu_seqlens, seqs.max_seqlen, scale, causal=False)  # None: not half precision
    return out if out is not None else masked_attention(q, k, v, seqs, scale)


# ----- rotary -----

class VisionRotary(nn.Module):
    """2-D rotary of a ViT: the first half of the frequency bands turn with the patch row, the second half with the
    column (each half the same `head_dim / 4` frequencies)."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        dim = head_dim // 2
        self.register_buffer("inv_freq", 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)),
                             persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [N, 2] (row, column) of each patch -> cos, sin [N, head_dim / 2] in float32: the first half of
        the reference's tables, whose second half repeats it."""
        freqs = (positions[..., None].float() * self.inv_freq).flatten(1)
        return freqs.cos(), freqs.sin()


def apply_vision_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary (rotate-half layout) on x [N, ..., head_dim], every head of token i by cos[i], sin[i] [N, head_dim / 2],
    computed in float32 and rounded once to x's dtype. x may cover q and k together (`qkv[:, :2]`).

    The kernel path (CUDA) rotates x in place and returns it; the eager path returns a new tensor."""
    if x.is_cuda or fused_ops.run_on_cpu:
        return _rotate_in_place(x, cos, sin)
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
    c, s = cos.view(shape), sin.view(shape)
    x1, x2 = x.float().chunk(2, dim=-1)
    # the reference's x * cat(c, c) + rotate_half(x) * cat(s, s), half by half
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


@functools.cache
def _rotary_kernel():
    """The Triton kernel, built on first use: a CPU-only install needs no Triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def rotate(X, Cos, Sin, n_heads, stride_xt, stride_xh, stride_ct,
               HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr):
        # program (token, block of heads)
        t = tl.program_id(0).to(tl.int64)
        heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        offs = tl.arange(0, BLOCK_HALF)
        band = offs < HALF
        c = tl.load(Cos + t * stride_ct + offs, mask=band, other=0.0)[None, :]
        s = tl.load(Sin + t * stride_ct + offs, mask=band, other=0.0)[None, :]
        mask = (heads < n_heads)[:, None] & band[None, :]
        p1 = X + t * stride_xt + heads[:, None] * stride_xh + offs[None, :]
        x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
        dt = X.dtype.element_ty
        tl.store(p1, (x1 * c - x2 * s).to(dt), mask=mask)
        tl.store(p1 + HALF, (x2 * c + x1 * s).to(dt), mask=mask)

    return triton, rotate


def _rotate_in_place(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    triton, rotate = _rotary_kernel()
    heads = x.view(x.shape[0], -1, x.shape[-1])  # [tokens, heads, head_dim]; raises where no view exists
    assert heads.stride(-1) == 1, "the rotary kernel needs contiguous head dims"
    assert cos.dtype == sin.dtype == torch.float32 and cos.is_contiguous() and sin.is_contiguous()
    tokens, n_heads, head_dim = heads.shape
    if tokens == 0:
        return x
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    block_h = max(1, min(triton.next_power_of_2(n_heads), 2048 // block_half))
    # enable_fp_fusion=False: no multiply-add contraction, so float32 results equal the eager products' sums
    rotate[(tokens, triton.cdiv(n_heads, block_h))](
        heads, cos, sin, n_heads, heads.stride(0), heads.stride(1), cos.stride(0),
        HALF=half, BLOCK_HALF=block_half, BLOCK_H=block_h, num_warps=4, enable_fp_fusion=False,
    )
    return x


# ----- layers -----

class VisionAttention(nn.Module):
    """qkv projection, 2-D rotary on q and k, attention within each packed sequence, output projection. Weight
    names as the Qwen-VL checkpoints have them (`qkv`, `proj`)."""

    def __init__(self, dim: int, num_heads: int, bias: bool = True, proj_bias: bool | None = None):
        """`proj_bias` defaults to `bias` (GLM-4.1V's tower has no output bias whatever its qkv has)."""
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias if proj_bias is None else proj_bias)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], seqs: PackedSeqs) -> torch.Tensor:
        n = x.shape[0]
        qkv = self.qkv(x).view(n, 3, self.num_heads, self.head_dim)
        q, k = apply_vision_rotary(qkv[:, :2], *rotary).unbind(1)  # q and k in one op
        out = varlen_attention(q, k, qkv[:, 2], seqs, self.scale)
        return self.proj(out.reshape(n, -1))


def _load_conv_weight(param: nn.Parameter, loaded: torch.Tensor) -> None:
    default_weight_loader(param, loaded.reshape(param.shape))


class PatchEmbed(nn.Module):
    """The patch projection. The checkpoints' Conv3d (or Conv2d) has stride equal to its kernel, so it is a matmul
    over each flattened patch; its [out, C, (T,) P, P] weight loads flattened."""

    def __init__(self, patch_dim: int, dim: int, bias: bool = False):
        super().__init__()
        self.proj = nn.Linear(patch_dim, dim, bias=bias)
        self.proj.weight.weight_loader = _load_conv_weight

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_values.to(self.proj.weight.dtype))


class VisionMLP(nn.Module):
    """Two linears around an activation; `names` are the checkpoint's names of the two (Qwen2-VL: fc1/fc2, Qwen3-VL:
    linear_fc1/linear_fc2)."""

    def __init__(self, dim: int, hidden: int, act: str, names: tuple[str, str] = ("fc1", "fc2")):
        super().__init__()
        self.up_name, self.down_name = names
        self.add_module(self.up_name, nn.Linear(dim, hidden))
        self.add_module(self.down_name, nn.Linear(hidden, dim))
        self.act = get_act_fn(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.down_name)(self.act(getattr(self, self.up_name)(x)))


class VisionBlock(nn.Module):
    """Pre-norm ViT block: attention and an MLP (any module [N, dim] -> [N, dim]), each with a residual. `norm` is the
    norm's class (nn.LayerNorm, or layers.norm.RMSNorm), built with `eps`; `attn` replaces the default
    `VisionAttention(dim, num_heads)` (a tower with other biases)."""

    def __init__(self, dim: int, num_heads: int, mlp: nn.Module, norm: type[nn.Module] = nn.LayerNorm,
                 eps: float = 1e-6, attn: VisionAttention | None = None):
        super().__init__()
        self.norm1 = norm(dim, eps=eps)
        self.norm2 = norm(dim, eps=eps)
        self.attn = attn if attn is not None else VisionAttention(dim, num_heads)
        self.mlp = mlp

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], seqs: PackedSeqs) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rotary, seqs)
        return x + self.mlp(self.norm2(x))


# ----- CUDA graphs -----

def vision_patch_buckets(max_patches: int) -> list[int]:
    """Captured tower sizes in patches: 256 and 512 (small images; launch-bound, so padding them costs nothing),
    then steps of half the size below (a bucket wastes at most a third of its patches) up to 4096, then 1024 at a
    time; the last is `max_patches` rounded up to a multiple of 64. A 448x448 image is 1024 patches."""
    if max_patches < 1:
        raise ValueError(f"vision_cuda_graph_max_patches must be >= 1 to capture, got {max_patches}")
    top = -(-max_patches // 64) * 64
    sizes = [256, 512, 1024, 1536, 2048, 3072, *range(4096, max(top, 4096) + 1, 1024)]
    return [*(s for s in sizes if s < top), top]


class VisionGraphRunner:
    """A vision tower replayed from CUDA graphs, one per patch bucket, captured once at start-up.

    A call of N patches pads to the smallest bucket B >= N: its pixels fill the first N rows of a static
    [max bucket, patch_dim] buffer, and its plan is padded and copied into one static int32 buffer: each planned
    tensor to B patches' rows with zeros (index 0 and position (0, 0) for the padding patches: finite values, and
    gathers that stay in range), each packing's sequences to a fixed count (`capacity`) of `cu_seqlens` entries:
    the real sequences, the B - N padding patches as sequences of at most the packing's longest, then empty ones.
    Padding patches attend only among themselves, so the first N / merge^2 output rows are the eager tower's. The
    flash kernel's `max_seqlen` is fixed per bucket at a bound (`tower.max_seqlens(B)`: B for frames, a window's
    patches for windows), so the sequence counts stay small where sequences may be long: `capacity` allows 8 times
    the sequences of that bound the bucket holds (at least 16), and a call with more runs eagerly.

    The tower must offer `plan(grids) -> VisionPlan`, `run(pixel_values, tensors, seqs)`, `max_seqlens(patches)`
    and `merge`. `use_graphs=False` keeps the buffers, buckets and padding but runs the tower eagerly: the CPU
    tests check the padding with it."""

    def __init__(self, tower: nn.Module, buckets: Sequence[int], use_graphs: bool = True):
        self.tower = tower
        self.buckets = sorted(buckets)
        self.use_graphs = use_graphs
        weight = tower.patch_embed.proj.weight
        unit = tower.merge**2
        assert all(b % unit == 0 for b in self.buckets), f"buckets must be multiples of {unit} patches"
        # shapes of each planned tensor per patch, from the plan of one merged unit
        self._per_unit = {name: t.shape for name, t in tower.plan([(1, tower.merge, tower.merge)]).tensors.items()}
        self._unit = unit
        self.capacity = {b: {name: max(16, 8 * b // bound) for name, bound in tower.max_seqlens(b).items()}
                         for b in self.buckets}
        size = max(self._int_size(b) for b in self.buckets)
        self.pixel_values = torch.zeros(self.buckets[-1], weight.shape[1], dtype=weight.dtype, device=weight.device)
        self.ints = torch.zeros(size, dtype=torch.int32, device=weight.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.capture_seconds = 0.0

    @property
    def max_patches(self) -> int:
        return self.buckets[-1]

    def _shapes(self, bucket: int) -> dict[str, tuple[int, ...]]:
        units = bucket // self._unit
        return {name: (shape[0] * units, *shape[1:]) for name, shape in self._per_unit.items()}

    def _int_size(self, bucket: int) -> int:
        return (sum(math.prod(s) for s in self._shapes(bucket).values())
                + sum(c + 1 for c in self.capacity[bucket].values()))

    def _views(self, bucket: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The bucket's planned tensors and cu_seqlens as views of the static int buffer (the layout `_pad` fills)."""
        shapes, caps = self._shapes(bucket), self.capacity[bucket]
        sizes = [math.prod(s) for s in shapes.values()] + [c + 1 for c in caps.values()]
        parts = self.ints[:sum(sizes)].split(sizes)
        tensors = {name: p.view(shape) for (name, shape), p in zip(shapes.items(), parts, strict=False)}
        return tensors, dict(zip(caps, parts[len(shapes):], strict=True))

    def _pad(self, plan: VisionPlan | None, bucket: int) -> tuple[torch.Tensor, dict[str, list[int]]] | None:
        """The host int32 contents of the static buffer for `plan` (None: a call of padding only) in `bucket`, and
        the padded lengths of each packing; None when a packing has more sequences than the bucket holds."""
        n = plan.patches if plan is not None else 0
        bounds = self.tower.max_seqlens(bucket)
        parts, packings = [], {}
        for name, shape in self._shapes(bucket).items():
            part = torch.zeros(shape, dtype=torch.int32)
            if plan is not None:
                planned = plan.tensors[name]
                part[: planned.shape[0]] = planned
            parts.append(part.flatten())
        pad = bucket - n
        for name, capacity in self.capacity[bucket].items():
            bound = bounds[name]
            lengths = list(plan.packings[name]) if plan is not None else []
            assert max(lengths, default=0) <= bound, f"a {name} sequence exceeds the bound of {bound} patches"
            lengths += [bound] * (pad // bound) + ([pad % bound] if pad % bound else [])
            if len(lengths) > capacity:
                return None
            lengths += [0] * (capacity - len(lengths))
            packings[name] = lengths
            parts.append(cu_seqlens(lengths))
        return torch.cat(parts), packings

    def _run(self, bucket: int, packings: dict[str, list[int]]) -> torch.Tensor:
        tensors, cus = self._views(bucket)
        bounds = self.tower.max_seqlens(bucket)
        # a new PackedSeqs per run: a block mask built here must be built inside the graph, not kept from before
        seqs = {name: PackedSeqs(cus[name], lengths, bounds[name]) for name, lengths in packings.items()}
        return self.tower.run(self.pixel_values[:bucket], tensors, seqs)

    def _load(self, host: torch.Tensor) -> None:
        if self.ints.is_cuda:
            host = host.pin_memory()
        self.ints[: host.numel()].copy_(host, non_blocking=True)

    @torch.inference_mode()
    def capture(self, pool=None, stream: torch.cuda.Stream | None = None) -> None:
        """Capture every bucket, largest first (they share the memory pool with the language model's graphs)."""
        start = time.perf_counter()
        if self.use_graphs:
            pool = pool if pool is not None else torch.cuda.graph_pool_handle()
            stream = stream if stream is not None else torch.cuda.Stream(self.ints.device)
        for bucket in reversed(self.buckets):
            host, packings = self._pad(None, bucket)
            self._load(host)
            if not self.use_graphs:
                continue
            stream.wait_stream(torch.cuda.current_stream())  # the padding plan's copy first
            with torch.cuda.stream(stream):
                for _ in range(2):  # compiles the kernels and creates library handles outside the capture
                    self._run(bucket, packings)
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self.outputs[bucket] = self._run(bucket, packings)
            self.graphs[bucket] = graph
        self.capture_seconds = time.perf_counter() - start

    @torch.inference_mode()
    def run(self, pixel_values: Sequence[torch.Tensor], grids: Sequence[Grid]) -> torch.Tensor | None:
        """Merged features of the items (pixel rows of each, their grids), as the tower's forward gives them; None
        when they do not fit a bucket (the caller runs the tower eagerly). A new tensor, not the graph's output."""
        n = sum(p.shape[0] for p in pixel_values)
        bucket = next((b for b in self.buckets if b >= n), None)
        if bucket is None or n == 0:
            return None
        padded = self._pad(self.tower.plan(grids), bucket)
        if padded is None:
            return None
        host, packings = padded
        pixels_to_device(pixel_values, self.pixel_values.device, out=self.pixel_values)
        self._load(host)
        if self.use_graphs:
            self.graphs[bucket].replay()
            out = self.outputs[bucket]
        else:
            out = self._run(bucket, packings)
        return out[: n // self._unit].clone()
