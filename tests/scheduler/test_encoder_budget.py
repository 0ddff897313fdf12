"""The encoder's share of a step: --max-encoder-tokens-per-step spreads a burst of images over several prefill
steps, the encoder cache keeps what a running step or a prompt still being prefilled in chunks needs (pins), and
none of it changes a token."""

from __future__ import annotations

import pytest
import torch
from vl_helpers import GREEDY, IMAGE, picture

from mmserve import Engine
from mmserve.multimodal.encoder_cache import EncoderCache

PROMPTS = [f"Describe {IMAGE} briefly.", f"What is in {IMAGE}?", f"{IMAGE} Say something.",
           f"Compare {IMAGE} with {IMAGE}."]


def _images():
    return [[picture(56, 56, 1)], [picture(84, 56, 2)], [picture(56, 84, 3)], [picture(56, 56, 4), picture(84, 84, 5)]]


def _tokens(engine: Engine, prompts=PROMPTS, images=None) -> list[list[int]]:
    return [r["output_ids"] for r in engine.generate(prompts, GREEDY, image_data=images or _images())]


def test_cache_pins_outlive_the_budget():
    cache = EncoderCache(capacity_bytes=100)
    a, b, c = torch.zeros(20), torch.zeros(20), torch.zeros(20)  # 80 bytes each
    cache.put(1, a)
    cache.put(2, b)  # over budget: 1 goes, 2 (just stored) stays
    assert 1 not in cache and 2 in cache
    cache.pin([2])  # a prompt prefilled in chunks still needs 2
    cache.pin([3])  # a step places 3 while it stores it
    cache.put(3, c)
    assert 2 in cache and 3 in cache and cache.used == 160  # both held, over budget
    cache.unpin([3])  # the step is over: 3 is the only entry free to go
    assert 2 in cache and 3 not in cache and cache.used == 80
    cache.pin([2])
    cache.unpin([2])
    assert cache.pinned(2) and cache.pin_count() == 1
    cache.unpin([2])
    assert not cache.pinned(2) and 2 in cache and cache.pin_count() == 0  # within budget: kept


def test_encoder_budget_spreads_images_over_steps(tiny_qwen2_vl_dir):
    """With a budget below one image, every prefill step takes one request (each has a new image): four steps of
    one request for four requests however they arrive, and the tokens of unbudgeted steps."""
    path = str(tiny_qwen2_vl_dir)
    with Engine(model_path=path, dtype="float32") as engine:
        together = _tokens(engine)
    with Engine(model_path=path, dtype="float32", max_encoder_tokens_per_step=1) as engine:
        sizes = []
        forward = engine.runner.forward
        engine.runner.forward = lambda batch: (sizes.append((batch.mode.name, batch.batch_size)), forward(batch))[1]
        spread = _tokens(engine)
        assert [n for mode, n in sizes if mode == "EXTEND"] == [1, 1, 1, 1]
        assert engine.scheduler.stats.prefill_steps == len(PROMPTS)
        assert engine.runner.model.encoder_cache.stores == 5
    assert spread == together


def test_a_tiny_encoder_cache_still_serves_every_step(tiny_qwen2_vl_dir):
    """A cache smaller than one image (0 MiB): two new images in one prompt both stay while the step places them,
    and a prompt prefilled in chunks of 8 encodes each image once although other images are stored between its
    chunks. The same tokens as with the default cache."""
    path = str(tiny_qwen2_vl_dir)
    long = f"Here is a long description before the first picture {IMAGE} and then the text goes on and on {IMAGE}."
    prompts = [long, PROMPTS[0], PROMPTS[3]]
    images = [[picture(56, 56, 6), picture(84, 56, 7)], [picture(56, 84, 8)], [picture(56, 56, 9), picture(84, 84, 10)]]
    with Engine(model_path=path, dtype="float32", chunked_prefill_size=8) as engine:
        want = _tokens(engine, prompts, images)
    with Engine(model_path=path, dtype="float32", chunked_prefill_size=8, mm_cache_size_mb=0) as engine:
        assert _tokens(engine, prompts, images) == want
        cache = engine.runner.model.encoder_cache
        assert cache.stores == 5 and len(cache) <= 1  # each image encoded once, then let go
        assert cache.pin_count() == 0


@pytest.mark.parametrize("bad", [0, -3])
def test_encoder_budget_flag_is_checked(bad, tiny_qwen2_vl_dir):
    from mmserve.config import ServerArgs

    with pytest.raises(ValueError, match="max_encoder_tokens_per_step"):
        ServerArgs(model_path=str(tiny_qwen2_vl_dir), max_encoder_tokens_per_step=bad)
