"""Our rotary frequency tables against transformers' own rope initialisation for every scaling we support."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from mmserve.layers.rotary import RotaryEmbedding, compute_inv_freq, rope_parameters

CASES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0, "original_max_position_embeddings": 64},
}


@pytest.mark.parametrize("kind", list(CASES))
def test_inv_freq_matches_transformers(kind):
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=256,
                         rope_parameters=dict(CASES[kind]))
    params = rope_parameters(config)
    ours, our_scale = compute_inv_freq(params, 16, 256)
    fn = ROPE_INIT_FUNCTIONS[kind] if kind != "default" else None
    if fn is None:
        ref, ref_scale = 1.0 / (params["rope_theta"] ** (torch.arange(0, 16, 2).float() / 16)), 1.0
    else:
        ref, ref_scale = fn(config, "cpu")
    torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=0)
    assert our_scale == pytest.approx(ref_scale)


def test_unsupported_rope_type_is_named():
    with pytest.raises(ValueError, match="dynamic"):
        compute_inv_freq({"rope_type": "dynamic", "rope_theta": 1.0}, 8, 8)


def test_rotation_preserves_norm_and_relative_position():
    rope = RotaryEmbedding(16, 64, {"rope_type": "default", "rope_theta": 10000.0})
    q, k = torch.randn(1, 2, 16), torch.randn(1, 2, 16)
    # <R(m) q, R(n) k> depends only on m - n
    dots = []
    for m, n in [(5, 2), (13, 10), (40, 37)]:
        qm, _ = rope(torch.tensor([m]), q, q)
        _, kn = rope(torch.tensor([n]), k, k)
        dots.append((qm * kn).sum())
    torch.testing.assert_close(dots[0], dots[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dots[0], dots[2], rtol=1e-4, atol=1e-4)
    qr, _ = rope(torch.tensor([7]), q, k)
    torch.testing.assert_close(qr.norm(), q.norm(), rtol=1e-5, atol=1e-5)
