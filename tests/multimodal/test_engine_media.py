"""The in-process Engine's media path: several prompts' media processed on a pool and submitted as each is ready
(the same tokens, in order, as one call per prompt), a failing prompt that stops the call without leaving the
earlier ones running, and per-call mm_processor_kwargs."""

from __future__ import annotations

import io

import pytest
from engine_helpers import assert_pool_consistent
from vl_helpers import GREEDY, IMAGE, picture

from mmserve import Engine

PROMPTS = [f"Describe {IMAGE} briefly.", f"What is in {IMAGE}?", f"{IMAGE} Say something.", f"Look: {IMAGE}"]


def _png(image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def engine(tiny_qwen2_vl_dir):
    with Engine(model_path=str(tiny_qwen2_vl_dir), dtype="float32", mm_processor_workers=3,
                chat_template="qwen2-vl") as e:
        yield e


def test_prompts_processed_together_give_each_ones_tokens(engine):
    images = [picture(56 + 28 * i, 56, i) for i in range(len(PROMPTS))]
    alone = [engine.generate(p, GREEDY, image_data=im) for p, im in zip(PROMPTS, images, strict=True)]
    together = engine.generate(PROMPTS, GREEDY, image_data=images)
    assert [r["output_ids"] for r in together] == [r["output_ids"] for r in alone]
    assert [r["meta_info"]["prompt_tokens"] for r in together] == [r["meta_info"]["prompt_tokens"] for r in alone]
    assert engine._prompt_pool is not None  # the pool ran them


def test_a_failing_prompt_stops_the_call_and_nothing_of_it_keeps_running(engine):
    images = [picture(56, 56, 1), picture(56, 56, 2), b"not an image at all", picture(56, 56, 3)]
    with pytest.raises(ValueError):
        engine.generate(PROMPTS, {**GREEDY, "max_new_tokens": 64}, image_data=images)
    engine.generate(PROMPTS[0], GREEDY, image_data=picture(56, 56, 4))  # still serving; the aborted ones are gone
    assert_pool_consistent(engine)


def test_mm_processor_kwargs_per_call(engine):
    image = _png(picture(224, 224, 5))
    full = engine.generate(PROMPTS[0], GREEDY, image_data=image)
    small = engine.generate(PROMPTS[0], GREEDY, image_data=image, mm_processor_kwargs={"max_pixels": 56 * 56})
    assert small["meta_info"]["prompt_tokens"] < full["meta_info"]["prompt_tokens"]
    messages = [{"role": "user", "content": [{"type": "image", "image": picture(224, 224, 5)},
                                             {"type": "text", "text": "Hi"}]}]
    chat_full = engine.chat(messages, GREEDY)
    chat_small = engine.chat(messages, GREEDY, mm_processor_kwargs={"max_pixels": 56 * 56})
    saved = full["meta_info"]["prompt_tokens"] - small["meta_info"]["prompt_tokens"]
    assert chat_full["meta_info"]["prompt_tokens"] - chat_small["meta_info"]["prompt_tokens"] == saved
    with pytest.raises(ValueError, match="not_a_setting"):
        engine.generate(PROMPTS[0], GREEDY, image_data=image, mm_processor_kwargs={"not_a_setting": 1})


def test_a_text_model_refuses_media_settings(tiny_model_dir):
    with Engine(model_path=str(tiny_model_dir("qwen2")), dtype="float32") as e:
        with pytest.raises(ValueError, match="mm_processor_kwargs"):
            e.generate("Hello", GREEDY, mm_processor_kwargs={"max_pixels": 100})
        with pytest.raises(ValueError, match="mm_processor_kwargs"):
            e.chat([{"role": "user", "content": "Hi"}], GREEDY, mm_processor_kwargs={"max_pixels": 100})


@pytest.mark.parametrize("fixture", ["tiny_qwen2_vl_dir", "tiny_qwen2_5_vl_dir", "tiny_qwen3_vl_dir"])
def test_start_up_warm_up_runs_the_vision_tower(fixture, request):
    """EngineCore.warm_up (run at start on a GPU) sends two small random images (16 and 12 patches) through the
    tower, leaving the encoder cache and the prefix cache empty."""
    from mmserve.config import ServerArgs
    from mmserve.engine_core import EngineCore

    core = EngineCore(ServerArgs(model_path=str(request.getfixturevalue(fixture)), dtype="float32"))
    model = core.runner.model
    calls = []
    tower = model.visual.forward
    model.visual.forward = lambda pixels, grid: (calls.append(tuple(grid[0].tolist())), tower(pixels, grid))[1]
    core.warm_up()
    merge = model.config.vision_config.spatial_merge_size
    assert calls == [(1, 2 * merge, 2 * merge), (1, merge, 3 * merge)]
    assert model.encoder_cache.stores == 0 and core.scheduler.tree.total_size() == 0
