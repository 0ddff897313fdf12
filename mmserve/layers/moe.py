"""Mixture-of-experts MLP: a top-k router and a bank of gated experts stored as 3-D tensors.

`RouterConfig` says how a token picks its experts, for every family in one description:
- softmax over all experts (in float32), the top k, optionally renormalised to sum to one, cast back to the
  activation dtype (Qwen3-MoE, Qwen3-VL-MoE: `SparseMoeBlock`);
- sigmoid scores from a float32 gate (DeepSeek-V3, GLM-4.5): a learned score-correction bias is added to the scores
  only to choose the experts (their weights are the uncorrected scores); the experts are split into `n_group` groups
  ranked by the sum of their two best corrected scores, and only the best `topk_group` groups are eligible; the top-k
  weights are renormalised and scaled by `routed_scaling_factor`, and kept in float32 until each expert's output is
  weighted, as those references do.
`MoeBlock` is a router, the routed experts and optionally shared experts (one gated MLP, always on) whose output is
added to the routed one; `deepseek_moe_mlp` places blocks by the DeepSeek-V3 / GLM-4.5 configs (the first
`first_k_dense_replace` layers keep the dense MLP).

Experts hold `gate_up_proj` [E, 2I, H] (gate rows, then up rows) and `down_proj` [E, H, I], transformers' layout.
Their `weight_loader` takes every layout checkpoints come in: the fused 3-D tensors as transformers keeps them, the
same transposed ([E, H, 2I] and [E, I, H], the original Qwen3-VL-MoE files), or one expert's 2-D gate/up/down
weight at a time (Qwen3-MoE and GLM-4.5 files: `experts.{e}.gate_proj.weight`). Tensor parallelism splits the
intermediate size, as a column-parallel gate/up and a row-parallel down; the routed output is all-reduced (the shared
experts' down projection reduces its own). The router is replicated.

The forward sorts the (token, expert) pairs by expert, runs every expert's gate/up and down projections over its
rows, and scatter-adds the outputs weighted by the router. Where torch's grouped GEMM works for the device and dtype
(checked once by a probe), each projection is one grouped matmul with no host sync; elsewhere a loop runs one matmul
per expert that received rows (the reference, also used where the grouped kernel lacks the dtype).
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from mmserve.distributed.parallel_state import get_tp_rank, get_tp_size, tp_all_reduce
from mmserve.layers.activation import get_act_fn
from mmserve.layers.linear import default_weight_loader, divide
from mmserve.layers.mlp import GatedMLP

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
        # float32 weights (the sigmoid router's) weight each output in float32 before it is cast back
        out = (mlp(x[token_of], counts) * topk_weights.flatten()[order, None]).to(x.dtype)
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


@dataclass(frozen=True)
class RouterConfig:
    """How each token picks its `top_k` of `num_experts` experts and weighs them (module docstring)."""

    num_experts: int
    top_k: int
    scoring: str = "softmax"  # "softmax" or "sigmoid"
    norm_topk_prob: bool = False
    score_correction_bias: bool = False  # a learned per-expert bias on the scores, for the choice only
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"unsupported router scoring {self.scoring!r}; supported: softmax, sigmoid")
        if self.num_experts % self.n_group or not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"{self.num_experts} experts cannot be split into n_group={self.n_group} groups with "
                             f"topk_group={self.topk_group} of them chosen")
        if not 1 <= self.top_k <= self.topk_group * (self.num_experts // self.n_group):
            raise ValueError(f"top_k={self.top_k} experts cannot be chosen from {self.topk_group} groups of "
                             f"{self.num_experts // self.n_group}")

    @classmethod
    def deepseek_v3(cls, config: PretrainedConfig) -> RouterConfig:
        """The router of a DeepSeek-V3-style config (GLM-4.5's uses the same names and is always sigmoid with the
        correction bias, DeepSeek-V3's `scoring_func` and `topk_method` defaults)."""
        method = getattr(config, "topk_method", "noaux_tc")
        if method not in ("noaux_tc", "greedy"):
            raise ValueError(f"unsupported router topk_method {method!r} (DeepSeek-V2's group-limited greedy ranks "
                             f"groups by their best score); supported: noaux_tc, greedy")
        grouped = method == "noaux_tc"
        return cls(config.n_routed_experts, config.num_experts_per_tok, getattr(config, "scoring_func", "sigmoid"),
                   norm_topk_prob=bool(getattr(config, "norm_topk_prob", True)), score_correction_bias=grouped,
                   n_group=(getattr(config, "n_group", None) or 1) if grouped else 1,
                   topk_group=(getattr(config, "topk_group", None) or 1) if grouped else 1,
                   routed_scaling_factor=float(getattr(config, "routed_scaling_factor", None) or 1.0))


class TopKRouter(nn.Module):
    """The gate ([E, H], no bias; float32 for the sigmoid router, whose references score in float32) and the
    correction bias where the config has one, under the checkpoints' names (`gate.weight`,
    `gate.e_score_correction_bias`)."""

    def __init__(self, hidden_size: int, config: RouterConfig):
        super().__init__()
        self.config = config
        dtype = torch.float32 if config.scoring == "sigmoid" else None
        self.weight = nn.Parameter(torch.empty(config.num_experts, hidden_size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = default_weight_loader
        if config.score_correction_bias:
            self.e_score_correction_bias = nn.Parameter(torch.empty(config.num_experts, dtype=torch.float32),
                                                        requires_grad=False)
        else:
            self.register_parameter("e_score_correction_bias", None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (weights [T, K], expert ids [T, K])."""
        logits = F.linear(x.to(self.weight.dtype), self.weight)
        return select_experts(logits, self.config, self.e_score_correction_bias, x.dtype)


def select_experts(logits: torch.Tensor, config: RouterConfig, correction_bias: torch.Tensor | None = None,
                   act_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (weights [T, K], expert ids [T, K]); the softmax router's weights in `act_dtype`
    (default: the logits'), the sigmoid router's in float32 (module docstring)."""
    if config.scoring == "softmax":
        scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
    else:
        scores = logits.float().sigmoid()
    choice = scores if correction_bias is None else scores + correction_bias
    if config.n_group > 1:
        groups = choice.unflatten(-1, (config.n_group, -1))
        ranked = groups.topk(min(2, groups.shape[-1]), dim=-1).values.sum(dim=-1)
        keep = torch.zeros_like(ranked, dtype=torch.bool).scatter_(
            1, ranked.topk(config.topk_group, dim=-1).indices, True)
        choice = groups.masked_fill(~keep[..., None], float("-inf")).flatten(1)
    if correction_bias is None and config.n_group == 1:
        weights, ids = scores.topk(config.top_k, dim=-1)
    else:
        ids = choice.topk(config.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
    if config.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if config.routed_scaling_factor != 1.0:
        weights = weights * config.routed_scaling_factor
    if config.scoring == "softmax":
        weights = weights.to(act_dtype or logits.dtype)
    return weights, ids


class MoeBlock(nn.Module):
    """Router (`gate`), routed experts (`experts`) and, with `shared_intermediate_size`, the shared experts
    (`shared_experts`, a gated MLP that every token goes through) added to the routed output."""

    def __init__(self, hidden_size: int, intermediate_size: int, router: RouterConfig, act: str = "silu",
                 shared_intermediate_size: int = 0):
        super().__init__()
        self.gate = TopKRouter(hidden_size, router)
        self.experts = FusedExperts(router.num_experts, hidden_size, intermediate_size, act)
        self.shared_experts = GatedMLP(hidden_size, shared_intermediate_size, act) if shared_intermediate_size else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        out = tp_all_reduce(self.experts(x, ids, weights))
        return out if self.shared_experts is None else out + self.shared_experts(x)


class SparseMoeBlock(MoeBlock):
    """The Qwen3-MoE block: softmax router, no shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 norm_topk_prob: bool, act: str = "silu"):
        super().__init__(hidden_size, intermediate_size,
                         RouterConfig(num_experts, top_k, norm_topk_prob=norm_topk_prob), act)

    @property
    def norm_topk_prob(self) -> bool:
        return self.gate.config.norm_topk_prob


def deepseek_moe_mlp(config: PretrainedConfig, layer_id: int) -> nn.Module:
    """The layer's MLP as DeepSeek-V3-style configs (GLM-4.5's too) place them: the dense gated MLP in the first
    `first_k_dense_replace` layers and off every `moe_layer_freq`-th, else routed experts plus
    `n_shared_experts` shared ones (one MLP as wide as all of them)."""
    if layer_id < config.first_k_dense_replace or layer_id % (getattr(config, "moe_layer_freq", None) or 1):
        return GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
    shared = config.moe_intermediate_size * (getattr(config, "n_shared_experts", None) or 0)
    return MoeBlock(config.hidden_size, config.moe_intermediate_size, RouterConfig.deepseek_v3(config),
                    config.hidden_act, shared_intermediate_size=shared)
