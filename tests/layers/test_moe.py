"""The mixture-of-experts block against transformers' Qwen3-MoE block, its weight loader on every checkpoint layout,
and its tensor-parallel split (two simulated ranks whose partial outputs sum to the whole)."""

from __future__ import annotations

import pytest
import torch

import mmserve.layers.moe as moe
from mmserve.layers.moe import SparseMoeBlock, expert_weight_target

E, K, H, INTER = 6, 2, 32, 24


def hf_block(norm_topk_prob: bool):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    config = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=INTER, num_experts=E, num_experts_per_tok=K,
                            norm_topk_prob=norm_topk_prob)
    torch.manual_seed(0)
    block = Qwen3MoeSparseMoeBlock(config).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.3)
    return block


def load_fused(block: SparseMoeBlock, ref) -> SparseMoeBlock:
    block.gate.weight.weight_loader(block.gate.weight, ref.gate.weight.detach())
    for name in ("gate_up_proj", "down_proj"):
        param = getattr(block.experts, name)
        param.weight_loader(param, getattr(ref.experts, name).detach())
    return block


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_matches_transformers_block(norm_topk_prob):
    ref = hf_block(norm_topk_prob)
    ours = load_fused(SparseMoeBlock(H, INTER, E, K, norm_topk_prob), ref)
    x = torch.randn(1, 40, H)  # 40 tokens x top-2 of 6 experts: every expert gets some
    with torch.no_grad():
        torch.testing.assert_close(ours(x[0]), ref(x)[0], atol=1e-5, rtol=1e-5)


def test_every_layout_loads_the_same_values():
    ref = hf_block(True)
    gate_up, down = ref.experts.gate_up_proj.detach(), ref.experts.down_proj.detach()  # [E, 2I, H], [E, H, I]
    fused = load_fused(SparseMoeBlock(H, INTER, E, K, True), ref).experts
    transposed = SparseMoeBlock(H, INTER, E, K, True).experts
    transposed.weight_loader(transposed.gate_up_proj, gate_up.transpose(1, 2).contiguous())
    transposed.weight_loader(transposed.down_proj, down.transpose(1, 2).contiguous())
    per_expert = SparseMoeBlock(H, INTER, E, K, True)
    params = dict(per_expert.named_parameters(prefix="mlp"))
    for e in range(E):
        for part, tensor in (("gate", gate_up[e, :INTER]), ("up", gate_up[e, INTER:]), ("down", down[e])):
            target, shard = expert_weight_target(f"mlp.experts.{e}.{part}_proj.weight")
            params[target].weight_loader(params[target], tensor, shard)
    for other in (transposed, per_expert.experts):
        assert torch.equal(other.gate_up_proj, fused.gate_up_proj)
        assert torch.equal(other.down_proj, fused.down_proj)
    assert expert_weight_target("model.layers.0.mlp.gate_proj.weight") is None


def test_tensor_parallel_shards_sum_to_the_whole(monkeypatch):
    """Each of two ranks holds half of every expert's intermediate size; with the all-reduce replaced by a sum of
    the ranks' outputs, the result is the unsharded block's."""
    ref = hf_block(True)
    whole = load_fused(SparseMoeBlock(H, INTER, E, K, True), ref)
    x = torch.randn(30, H)
    parts = []
    for rank in range(2):
        monkeypatch.setattr(moe, "get_tp_size", lambda: 2)
        monkeypatch.setattr(moe, "get_tp_rank", lambda rank=rank: rank)
        shard = load_fused(SparseMoeBlock(H, INTER, E, K, True), ref)
        assert shard.experts.gate_up_proj.shape == (E, INTER, H)  # half the gate rows and half the up rows
        parts.append(shard(x))
    with torch.no_grad():
        torch.testing.assert_close(parts[0] + parts[1], whole(x), atol=1e-5, rtol=1e-5)


DEVICES = [("cpu", torch.float32)] + ([("cuda", torch.bfloat16)] if torch.cuda.is_available() else [])


@pytest.mark.parametrize(("device", "dtype"), DEVICES)
def test_grouped_matmul_path_equals_the_loop(device, dtype):
    """The grouped-GEMM path (chosen where torch's kernel works) and the one-expert-at-a-time loop agree, with some
    experts given no rows at all."""
    from mmserve.layers.moe import grouped_mm_works

    assert grouped_mm_works(torch.device(device), dtype)  # torch >= 2.9 has the kernel on the CPU and on Hopper
    torch.manual_seed(0)
    with torch.device(device):
        block = load_fused(SparseMoeBlock(H, INTER, E, K, True), hf_block(True)).to(dtype)
        rows = torch.randn(11, H, dtype=dtype)
        counts = torch.tensor([4, 0, 3, 0, 4, 0])
    grouped, looped = block.experts.grouped(rows, counts), block.experts.looped(rows, counts)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(grouped, looped, atol=tol, rtol=tol)
