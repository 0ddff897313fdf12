"""Tensor parallelism: `tp_size` 2 gives the tokens `tp_size` 1 gives, on the same weights.

Two ranks on the CPU talk over gloo (on a GPU machine, NCCL between two GPUs: `scripts/gpu_check.sh`). Covered:
key/value heads split and replicated, a mixture of experts, chunked prefill, a prefix-cache hit, seeded sampling,
an image prompt with the vision tower replicated and data-parallel (--mm-enable-dp-encoder),
cross-attention over images (Llama 3.2 Vision).
"""

from __future__ import annotations

import shutil

import pytest
import torch
from vl_helpers import IMAGE, picture

from mmserve import Engine
from mmserve.config import ModelConfig, ServerArgs
from mmserve.distributed.parallel_state import get_tp_size, split_by_size

DEVICE = "cuda" if torch.cuda.device_count() >= 2 else "cpu"
# on GPUs: CUDA graphs (the collectives captured in them) for a few batch sizes and prefill lengths, not hundreds
GRAPHS = ({"cuda_graph_max_bs": 8, "cuda_graph_max_prefill_tokens": 128, "vision_cuda_graph_max_patches": 512}
          if DEVICE == "cuda" else {})
GREEDY = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True, "logprobs": True}
# Every rank samples from the same gathered logits with the same seed: the same tokens as one rank.
SAMPLED = {"temperature": 1.0, "top_p": 0.9, "max_new_tokens": 8, "ignore_eos": True, "seed": 3, "logprobs": True}
# A long prompt that chunked prefill cuts (chunks of 16 tokens), and one sharing its start (a prefix-cache hit).
LONG = "The history of the city begins with a small settlement by the river, where traders met " * 3
PROMPTS = ["The capital of France is", LONG, LONG + "and then", "Hello"]
PARAMS = [GREEDY, GREEDY, GREEDY, SAMPLED]


def run(model_dir, tp: int, prompts=PROMPTS, params=PARAMS, **kwargs):
    with Engine(model_path=str(model_dir), dtype="float32", device=DEVICE, tp_size=tp, chunked_prefill_size=16,
                **GRAPHS, **kwargs) as engine:
        # the shared prefix is cached by the first two prompts before the third arrives
        first = engine.generate(prompts[:2], params[:2])
        rest = engine.generate(prompts[2:], params[2:])
        hits = engine.scheduler.stats.cached_tokens
    return [(r["output_ids"], [entry[0] for entry in r["meta_info"]["output_token_logprobs"]])
            for r in first + rest], hits


def assert_same(ours, ref):
    (ours, hits), (ref, ref_hits) = ours, ref
    for (ids, lps), (ref_ids, ref_lps) in zip(ours, ref, strict=True):
        assert ids == ref_ids
        assert torch.allclose(torch.tensor(lps), torch.tensor(ref_lps), atol=1e-4)
    assert hits > 0 and ref_hits > 0  # the third prompt read the second one's prefix from the cache


@pytest.fixture(scope="module")
def kv1_model_dir(tokenizer_dir, tmp_path_factory):
    """A Qwen2 (q/k/v biases) with one key/value head: two ranks each hold a copy of it."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(7)
    config = Qwen2Config(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=1024,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    out = tmp_path_factory.mktemp("tiny_qwen2_kv1")
    model.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_tp2_equals_tp1(tiny_model_dir, family):
    """llama: 2 key/value heads, one per rank; qwen3_moe: experts split by width across ranks. The tp 1 run comes
    second: the Engine of tp 2 left the process group, so this process is single-rank again."""
    model = tiny_model_dir(family)
    ours = run(model, 2)
    assert get_tp_size() == 1
    assert_same(ours, run(model, 1))


def test_tp2_with_replicated_kv_heads(kv1_model_dir):
    assert_same(run(kv1_model_dir, 2), run(kv1_model_dir, 1))


def test_tp2_image_prompt_with_a_data_parallel_encoder(tiny_qwen2_vl_dir):
    """Two images of different sizes in one prompt (one step): each rank encodes one, the outputs are gathered, and
    the answer is one rank's."""
    prompt = f"<|im_start|>user\n{IMAGE}{IMAGE}Compare them.<|im_end|>\n<|im_start|>assistant\n"
    images = [picture(56, 84, 1), picture(112, 56, 2)]

    def answer(tp: int, **kwargs):
        with Engine(model_path=str(tiny_qwen2_vl_dir), dtype="float32", device=DEVICE, tp_size=tp, **GRAPHS,
                    **kwargs) as engine:
            model, encoded = engine.runner.model, []
            encode = model.encode
            model.encode = lambda items: encoded.extend(items) or encode(items)  # rank 0's encoder calls
            return engine.generate(prompt, GREEDY, image_data=images)["output_ids"], len(encoded)

    # (the replicated tower at tp 2 is tests/models/test_glm4v.py's tensor-parallel case)
    ref, encoded = answer(1)
    assert encoded == 2
    assert answer(2, mm_enable_dp_encoder=True) == (ref, 1)  # rank 1 encoded the other image


def test_tp2_cross_attention(tiny_mllama_dir):
    """Llama 3.2 Vision: each rank keeps its key/value head of every image in its slabs and its share of the
    cross-attention layers; a request with two images, a text-only one and one with one image (prefilled and
    decoded together) give tp 1's tokens and log-probs."""
    turn = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
    reply = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    prompts = [f"{turn}First <|image|> then <|image|> compare them.{reply}", f"{turn}No pictures here.{reply}",
               f"{turn}<|image|>Describe it.{reply}"]
    images = [[picture(60, 30, 1), picture(30, 80, 2)], None, [picture(40, 40, 3)]]

    def answers(tp: int):
        with Engine(model_path=str(tiny_mllama_dir), dtype="float32", device=DEVICE, tp_size=tp, **GRAPHS) as engine:
            outs = engine.generate(prompts, [GREEDY] * 3, image_data=images)
        return [(r["output_ids"], [entry[0] for entry in r["meta_info"]["output_token_logprobs"]]) for r in outs]

    ours = answers(2)
    for (ids, lps), (ref_ids, ref_lps) in zip(ours, answers(1), strict=True):
        assert ids == ref_ids
        assert torch.allclose(torch.tensor(lps), torch.tensor(ref_lps), atol=1e-4)


def test_heads_that_do_not_divide_are_refused_before_loading(tiny_model_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir("llama"))  # 4 query heads, 2 key/value heads
    ModelConfig.from_hf(config, ServerArgs(model_path=".", tp_size=4), torch.device("cpu"))  # kv heads replicated
    with pytest.raises(ValueError, match="does not divide the model's attention: 4 query heads"):
        ModelConfig.from_hf(config, ServerArgs(model_path=".", tp_size=8), torch.device("cpu"))
    config.num_key_value_heads = 3
    config.num_attention_heads = 6
    with pytest.raises(ValueError, match="6 query heads and 3 key/value heads"):
        ModelConfig.from_hf(config, ServerArgs(model_path=".", tp_size=2), torch.device("cpu"))


def test_media_items_are_dealt_to_ranks_by_size():
    assert split_by_size([1024, 256, 256, 512], 2) == [[0], [1, 2, 3]]
    assert split_by_size([5], 2) == [[0], []]
    assert split_by_size([], 3) == [[], [], []]
    assert split_by_size([3, 3, 3], 3) == [[0], [1], [2]]
