"""Mixture-of-experts MLP: a softmax top-k router and a bank of gated experts stored as 3-D tensors.

`SparseMoeBlock` is the Qwen3-MoE / Qwen3-VL-MoE block: softmax over all experts (in float32), the top k, optionally
renormalised to sum to one, cast back to the activation dtype, and a weighted sum of the chosen experts' outputs.

Experts hold `gate_up_proj` [E, 2I, H] (gate rows, then up rows) and `down_proj` [E, H, I], transformers' layout.
Their `weight_loader` takes every layout checkpoints come in: the fused 3-D tensors as transformers keeps them, the
same transposed ([E, H, 2I] and [E, I, H], the original Qwen3-VL-MoE files), or one expert's 2-D gate/up/down
weight at a time (Qwen3-MoE files: `experts.{e}.gate_proj.weight`). Tensor parallelism splits the intermediate
size, as a column-parallel gate/up and a row-parallel down; the block's output is all-reduced.

The forward sorts the (token, expert) pairs by expert, runs every expert's gate/up and down projections over its
rows, and scatter-adds the outputs weighted by the router. Where torch's grouped GEMM works for the device and dtype
(checked once by a probe), each projection is one grouped matmul with no host sync; elsewhere a loop runs one matmul
per expert that received rows (the reference, also used where the grouped kernel lacks the dtype).
"""

from __future__ import annotations

import functools
import logging
import re

import torch
import torch.nn.functional as F
from torch import nn

from mmserve.distributed.parallel_state import get_tp_rank, get_tp_size, tp_all_reduce
from mmserve.layers.activation import get_act_fn
from mmserve.layers.linear import ReplicatedLinear, divide

logger = logging.getLogger(__name__)

_EXPERT_WEIGHT = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<expert>\d+)\.(?P<part>gate|up|down)_proj\.weight$")


def expert_weight_target(name: str) -> tuple[str, tuple[int, str]] | None:
    """For one expert's 2-D checkpoint tensor (`...experts.3.up_proj.weight`): the fused parameter it belongs to and
    the loader's shard id (expert, part); None for any other name."""
    m = _EXPERT_WEIGHT.match(name)
    if m is None:
        return None
    fused = "gate_up_proj" if m["part"] in ("gate", "up") else "down_proj"
    return f"{m['prefix']}.{fused}", (int(m["expert"]), m["part"])


class FusedExperts(nn.Module):
    """E gated MLPs of width I (this rank's share of it) as two 3-D parameters; see the module docstring."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, act: str = "silu"):
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.num_experts, self.hidden_size = num_experts, hidden_size
        self.full_intermediate = intermediate_size
        self.intermediate = divide(intermediate_size, self.tp_size)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * self.intermediate, hidden_size),
                                         requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, self.intermediate), requires_grad=False)
        for p in (self.gate_up_proj, self.down_proj):
            p.weight_loader = self.weight_loader
        self.act = get_act_fn(act)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: tuple[int, str] | None = None) -> None:
        """Copy this rank's share of a checkpoint tensor: a whole fused [E, ...] tensor (shard_id None) or one
        expert's gate, up or down matrix (shard_id (expert, part))."""
        size, start = self.intermediate, self.tp_rank * self.intermediate
        is_down = param is self.down_proj
        if shard_id is None:
            full = ((self.num_experts, self.hidden_size, self.full_intermediate) if is_down
                    else (self.num_experts, 2 * self.full_intermediate, self.hidden_size))
            if tuple(loaded.shape) != full:  # the transposed layout; a square one is taken as-is, as transformers does
                loaded = loaded.transpose(1, 2)
            assert tuple(loaded.shape) == full, f"expert tensor of shape {tuple(loaded.shape)}, expected {full}"
            if is_down:
                param.data.copy_(loaded.narrow(2, start, size))
            else:
                gate, up = loaded.split(self.full_intermediate, dim=1)
                param.data.copy_(torch.cat([gate.narrow(1, start, size), up.narrow(1, start, size)], dim=1))
            return
        expert, part = shard_id
        if part == "down":
            target, piece = param.data[expert], loaded.narrow(1, start, size)
        else:
            target = param.data[expert].narrow(0, 0 if part == "gate" else size, size)
            piece = loaded.narrow(0, start, size)
        assert target.shape == piece.shape, f"expert {expert} {part}: {tuple(piece.shape)} vs {tuple(target.shape)}"
        target.copy_(piece)

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """x [T, H]; topk_ids, topk_weights [T, K] -> sum over k of weight * expert(x), [T, H] (this rank's part)."""
        k = topk_ids.shape[1]
        flat = topk_ids.flatten()
        # stable: within an expert, rows keep token order, and the scatter-add below sums experts in index order
        order = flat.argsort(stable=True)
        token_of = order // k
        # not bincount, which reads the largest id back to the host (a sync, and no CUDA-graph capture)
        counts = torch.zeros(self.num_experts, dtype=torch.int64, device=x.device).index_add_(
            0, flat, torch.ones_like(flat))
        mlp = self.grouped if grouped_mm_works(x.device, x.dtype) else self.looped
        out = mlp(x[token_of], counts) * topk_weights.flatten()[order, None]
        return torch.zeros_like(x).index_add_(0, token_of, out)

    def grouped(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The experts' gated MLP over rows sorted by expert (`counts` rows each): two grouped matmuls."""
        offsets = counts.cumsum(0).to(torch.int32)
        gate, up = _GROUPED_MM(rows, self.gate_up_proj.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
        return _GROUPED_MM(self.act(gate) * up, self.down_proj.transpose(1, 2), offs=offsets)

    def looped(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The same as `grouped`, one expert at a time (one host sync for the counts, so never in a CUDA graph:
        see `capturable`)."""
        out = torch.empty_like(rows)
        start = 0
        for expert, count in enumerate(counts.tolist()):
            if count:
                seg = slice(start, start + count)
                gate, up = F.linear(rows[seg], self.gate_up_proj[expert]).chunk(2, dim=-1)
                out[seg] = F.linear(self.act(gate) * up, self.down_proj[expert])
                start += count
        return out


# torch >= 2.10 names it in torch.nn.functional; earlier releases have the private op
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


@functools.cache
def grouped_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's grouped matmul runs on this device and dtype and agrees with plain matmuls (some builds lack
    a CPU kernel or a dtype); probed once on a small problem with an empty group."""
    if _GROUPED_MM is None:
        return False
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(24, 16, device=device, dtype=dtype, generator=gen)
    w = torch.randn(3, 32, 16, device=device, dtype=dtype, generator=gen)
    try:
        got = _GROUPED_MM(x, w.transpose(1, 2), offs=torch.tensor([8, 8, 24], dtype=torch.int32, device=device))
    except (RuntimeError, NotImplementedError) as e:
        logger.info("grouped matmul unavailable on %s for %s (%s): experts run one at a time", device, dtype, e)
        return False
    want = torch.cat([F.linear(x[:8], w[0]), F.linear(x[8:], w[2])])
    return bool(torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2))


def capturable(model: nn.Module) -> bool:
    """Whether every expert bank of the model runs without a host sync, which a CUDA graph needs: torch's grouped
    matmul in bfloat16 (its native kernel; other dtypes take a fallback that copies through the host, which torch
    2.11 refuses inside a capture), not the per-expert loop."""
    for module in model.modules():
        if isinstance(module, FusedExperts):
            p = module.gate_up_proj
            return p.dtype == torch.bfloat16 and grouped_mm_works(p.device, p.dtype)
    return True


class SparseMoeBlock(nn.Module):
    """Router (`gate`, [E, H], no bias) and experts, as Qwen3-MoE names them."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 norm_topk_prob: bool, act: str = "silu"):
        super().__init__()
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob
        self.gate = ReplicatedLinear(hidden_size, num_experts, bias=False)
        self.experts = FusedExperts(num_experts, hidden_size, intermediate_size, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.gate(x)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return tp_all_reduce(self.experts(x, ids, weights.to(logits.dtype)))
