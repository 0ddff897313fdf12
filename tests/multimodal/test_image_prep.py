"""Images prepared in the engine (--mm-image-prep engine): the API process plans each image (its grid and placeholder
expansion) and sends it resized, as uint8; the engine runs the rest of the model's image processor. The plan must
be exactly what the Hugging Face processor makes, the engine's pixels exactly the processor's, and the answers
transformers'."""

from __future__ import annotations

import pytest
import torch
from vl_helpers import GREEDY, IMAGE, assert_same, hf_generate, picture

from mmserve import Engine
from mmserve.config import ServerArgs
from mmserve.multimodal.image_prep import EngineImagePrep
from mmserve.multimodal.inputs import from_wire, to_wire
from mmserve.multimodal.processor import MultimodalProcessor
from mmserve.multimodal.processors import ProcessorRegistry

PROMPT = f"Compare {IMAGE} with {IMAGE} and {IMAGE}."
# sizes whose grids round differently (odd patches, a long side, a small one scaled up to min_pixels)
IMAGES = [picture(300, 200, 0), picture(90, 120, 1), picture(20, 45, 2)]


def processor(model_dir, prep: str) -> MultimodalProcessor:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    args = ServerArgs(model_path=str(model_dir), mm_image_prep=prep, mm_processor_workers=1)
    return MultimodalProcessor(args, ProcessorRegistry.resolve(config.architectures), config, model_dir)


@pytest.mark.parametrize("family", ["tiny_qwen2_vl_dir", "tiny_qwen3_vl_dir", "tiny_qwen3_omni_dir"])
@pytest.mark.parametrize("kwargs", [None, {"max_pixels": 70 * 70}], ids=["defaults", "max_pixels"])
def test_plan_and_pixels_equal_the_processor(family, kwargs, request):
    """Qwen3-Omni too (its image processor is Qwen2-VL's), where transformers' processor can expand a placeholder
    from a grid (5.24; 5.17's cannot: its images stay prepared in the API process)."""
    model_dir = request.getfixturevalue(family)
    api, engine = processor(model_dir, "api"), processor(model_dir, "engine")
    if not engine.images_in_engine:
        assert family == "tiny_qwen3_omni_dir" and "replace_image_token" not in vars(type(engine.hf))
        api.close()
        engine.close()
        return
    try:
        media = [("image", image) for image in IMAGES]
        ids, ref = api.process(PROMPT, media, api.settings_for(kwargs))
        planned_ids, planned = engine.process(PROMPT, media, engine.settings_for(kwargs))
    finally:
        api.close()
        engine.close()
    assert planned_ids == ids
    assert torch.equal(planned.mrope_positions, ref.mrope_positions)
    # what crosses to the engine is the decoded image: one byte a channel
    assert all(item.features["image_uint8"].dtype == torch.uint8 and "pixel_values" not in item.features
               for item in planned.items)
    assert [it.hash for it in planned.items] == [it.hash for it in ref.items]
    received = from_wire(to_wire(planned)).items
    prepared = EngineImagePrep(model_dir, False, torch.device("cpu"))(received)
    for ours, theirs in zip(prepared, ref.items, strict=True):
        assert torch.equal(ours.features["pixel_values"], theirs.features["pixel_values"])
        assert torch.equal(ours.features["grid_thw"], theirs.features["grid_thw"])
        assert (ours.offset, ours.length, ours.hash) == (theirs.offset, theirs.length, theirs.hash)
    if torch.cuda.is_available():  # the same arithmetic on the GPU, to float rounding (the resize stays on the CPU)
        on_gpu = EngineImagePrep(model_dir, False, torch.device("cuda"))(received)
        for ours, theirs in zip(on_gpu, ref.items, strict=True):
            torch.testing.assert_close(ours.features["pixel_values"].cpu(), theirs.features["pixel_values"],
                                       atol=1e-5, rtol=0)


def test_engine_prep_matches_transformers_through_chunks_and_the_cache(tiny_qwen2_5_vl_dir):
    """Qwen2.5-VL (windowed tower) with images prepared in the engine: transformers' tokens and logits, also with
    chunked prefill cutting the images, and a repeat of the same images served from the prefix cache."""
    from transformers import AutoProcessor
    from transformers import Qwen2_5_VLForConditionalGeneration as HFQwen2_5_VL

    hf = (HFQwen2_5_VL.from_pretrained(tiny_qwen2_5_vl_dir, dtype=torch.float32).eval(),
          AutoProcessor.from_pretrained(tiny_qwen2_5_vl_dir))
    ref = hf_generate(hf, PROMPT, IMAGES)
    with Engine(model_path=str(tiny_qwen2_5_vl_dir), dtype="float32", mm_image_prep="engine",
                chunked_prefill_size=48) as engine:
        first = engine.generate(PROMPT, GREEDY, return_logits=True, image_data=IMAGES)
        again = engine.generate(PROMPT, GREEDY, return_logits=True, image_data=IMAGES)
    assert_same(first, ref)
    assert_same(again, ref)
    assert again["meta_info"]["cached_tokens"] >= first["meta_info"]["prompt_tokens"] - 1
