"""Llama 3.2 Vision (Mllama) against transformers on a tiny random model (float32, CPU): text only (the
cross-attention layers skipped), one image, two images with different tile counts (apart and adjacent), chunked
prefill through the image tokens, the prefix cache (a repeated image hits it; other images or none must not share
the text before the first image, which attends to all of them), and chat through the hub-style template."""

from __future__ import annotations

import pytest
import torch
from vl_helpers import GREEDY, assert_same, check_chunked_prefill, hf_generate, image_data_url, picture

from mmserve import Engine
from mmserve.config import ServerArgs
from mmserve.engine_core import EngineCore
from mmserve.messages import GenerateRequest
from mmserve.models.mllama import MllamaForConditionalGeneration
from mmserve.multimodal.inputs import MultimodalItem
from mmserve.multimodal.processors.mllama import OPEN_END, cross_attention_spans
from mmserve.runner.cuda_graph import CudaGraphRunner

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs the Triton kernels in the interpreter

BOS, IMAGE = "<|begin_of_text|>", "<|image|>"
TURN = "<|start_header_id|>user<|end_header_id|>\n\n"
REPLY = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"


@pytest.fixture(scope="module")
def hf(tiny_mllama_dir):
    from transformers import AutoProcessor, MllamaForConditionalGeneration

    model = MllamaForConditionalGeneration.from_pretrained(tiny_mllama_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(tiny_mllama_dir)


@pytest.fixture(scope="module")
def engine(tiny_mllama_dir):
    with Engine(model_path=str(tiny_mllama_dir), dtype="float32") as e:
        yield e


# 60x30 px becomes 2 tiles of 28 px, 30x80 px 3, 40x40 px 4 (of the 4 at most): the rest of each image's tiles are
# padding that its tokens must not see (but the text before the first image sees, as transformers has it)
CASES = {
    "text only": (f"{BOS}{TURN}Just some text without pictures.{REPLY}", []),
    "one image": (f"{BOS}{TURN}{IMAGE}Describe it briefly.{REPLY}", [picture(60, 30, 0)]),
    "two images": (f"{BOS}{TURN}First {IMAGE} then {IMAGE} compare them.{REPLY}",
                   [picture(60, 30, 1), picture(30, 80, 2)]),
    "adjacent images": (f"{BOS}{TURN}{IMAGE}{IMAGE}Two at once.{REPLY}", [picture(40, 40, 3), picture(90, 30, 4)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers(case, engine, hf):
    prompt, images = CASES[case]
    ours = engine.generate(prompt, GREEDY, return_logits=True, image_data=images or None)
    assert_same(ours, hf_generate(hf, prompt, images))


def test_batch_of_prompts_with_and_without_images(engine, hf):
    """Requests with other images, and one with none, prefilled and decoded in the same steps: each reads its own
    images (the text-only one skips the cross-attention layers) and gets transformers' answer."""
    cases = [CASES["two images"], CASES["text only"], CASES["one image"]]
    sizes = []
    forward = engine.runner.forward

    def spy(batch, *args, **kwargs):
        sizes.append(batch.batch_size)
        return forward(batch, *args, **kwargs)

    engine.runner.forward = spy
    try:
        outs = engine.generate([prompt for prompt, _ in cases], GREEDY, return_logits=True,
                               image_data=[images or None for _, images in cases])
    finally:
        engine.runner.forward = forward
    assert max(sizes) == len(cases)
    for ours, (prompt, images) in zip(outs, cases, strict=True):
        assert_same(ours, hf_generate(hf, prompt, images))


def _generate_batch(engine: Engine) -> list[dict]:
    cases = [CASES["two images"], CASES["text only"], CASES["one image"]]
    return engine.generate([prompt for prompt, _ in cases], GREEDY, return_logits=True,
                           image_data=[images or None for _, images in cases])


def _assert_released(engine: Engine) -> None:
    """Every request gone: no image pinned, every decode row reads nothing, nothing kept outside the slabs."""
    model = engine.runner.model
    cache = model.encoder_cache
    assert cache.pin_count() == 0 and not model._requests and not model._eager_rows
    assert int(model.cross_lens.abs().sum()) == 0
    assert all(cache.get(key).slots is not None for key in list(cache._entries))


def test_decode_reads_the_slabs_from_graph_steps(tiny_mllama_dir, hf):
    """Decode steps through the graph runner's static buffers, the cross-attention layers reading each request's
    image rows through its table row with the Triton decode kernel (captured on a GPU; on the CPU the runner's
    eager mode with the kernels in the interpreter): three requests in the bucket of 4 (a padding row), one
    without images, each with transformers' answer; their rows released when they finish."""
    kwargs = {} if DEVICE == "cuda" else {"disable_cuda_graph": True}
    with Engine(model_path=str(tiny_mllama_dir), dtype="float32", attention_backend="triton", device=DEVICE,
                cuda_graph_max_bs=4, **kwargs) as engine:
        graphs = engine.runner.graph_runner
        if graphs is None:
            graphs = engine.runner.graph_runner = CudaGraphRunner(engine.runner, 4, use_graphs=False)
            graphs.capture()
        assert engine.runner.prefill_graph_runner is None  # prefill steps look images up on the host
        replays = []
        original = graphs.replay
        graphs.replay = lambda batch: (replays.append(batch.batch_size), original(batch))[1]
        outs = _generate_batch(engine)
        assert 3 in replays
        _assert_released(engine)
    cases = [CASES["two images"], CASES["text only"], CASES["one image"]]
    for ours, (prompt, images) in zip(outs, cases, strict=True):
        assert_same(ours, hf_generate(hf, prompt, images))


@pytest.fixture
def small_slabs(monkeypatch):
    """Slabs of 100 rows against images of 68 (4 tiles of 17)."""
    attach = MllamaForConditionalGeneration.attach_cross_kv
    monkeypatch.setattr(MllamaForConditionalGeneration, "attach_cross_kv",
                        lambda self, tokens, table_rows: attach(self, tokens, table_rows, rows=100))


def test_images_the_slabs_cannot_hold_decode_eagerly(tiny_mllama_dir, hf, small_slabs):
    """A request with two images (136 rows) is admitted while nothing else holds the slabs: its second image is
    kept outside them, and its decode steps attend to it per request (eagerly) while the text-only request beside
    it reads the slabs; transformers' answers, and what was kept outside goes when the request finishes."""
    with Engine(model_path=str(tiny_mllama_dir), dtype="float32") as engine:
        model = engine.runner.model
        outside = []
        original = model._outside
        model._outside = lambda batch: (outside.append(len(original(batch))), original(batch))[1]
        outs = _generate_batch(engine)
        assert 1 in outside
        _assert_released(engine)
        assert len(model.encoder_cache) == 1 and model.encoder_cache.free_rows == 100 - 68
    cases = [CASES["two images"], CASES["text only"], CASES["one image"]]
    for ours, (prompt, images) in zip(outs, cases, strict=True):
        assert_same(ours, hf_generate(hf, prompt, images))


def _first_steps(engine: Engine, jobs: list[tuple[str, list]], **server_args) -> list[int]:
    """Requests of `jobs`, all waiting before the first step of a fresh engine core: its prefill batch sizes."""
    core = EngineCore(ServerArgs(model_path=engine.args.model_path, dtype="float32", **server_args))
    for i, (text, pictures) in enumerate(jobs):
        ids, wire = engine._encode_multimodal(text, pictures, [], [], None)
        core.handle(GenerateRequest(f"r{i}", ids, {**GREEDY, "max_new_tokens": 1}, mm_inputs=wire))
    sizes = []
    forward = core.runner.forward
    core.runner.forward = lambda batch: (sizes.append((batch.mode.name, batch.batch_size)), forward(batch))[1]
    while core.has_work():
        core.step()
    return [n for mode, n in sizes if mode == "EXTEND"]


def test_admission_waits_for_room_in_the_slabs(engine, small_slabs):
    """Two waiting requests with an image each (68 rows) and slabs of 100: the second waits for the first to
    leave (its rows are pinned until then); a text-only request needs no room and joins the first."""
    (prompt, images), (text_prompt, _) = CASES["one image"], CASES["text only"]
    jobs = [(prompt, images), (text_prompt, []), (prompt.replace("Describe", "Explain"), [picture(50, 50, 11)])]
    assert _first_steps(engine, jobs) == [2, 1]


def test_encoder_budget_counts_every_tile(engine):
    """An image is one token but 4 tiles of 24 padded rows through the tower: with --max-encoder-tokens-per-step
    150, two waiting requests with new images go to separate prefill steps (counted by tokens, both would fit), and
    a text-only one joins the second; the text before an image costs nothing."""
    model = engine.runner.model
    assert [model.encoder_cost(it) for it in (MultimodalItem("text", {}, 0, 5), MultimodalItem("image", {}, 5, 1))] \
        == [0, 96]
    (prompt, images), (text_prompt, _) = CASES["one image"], CASES["text only"]
    jobs = [(prompt, images), (prompt.replace("Describe", "Explain"), [picture(50, 50, 11)]), (text_prompt, [])]
    assert _first_steps(engine, jobs, max_encoder_tokens_per_step=150) == [1, 2]


def test_spans_follow_the_processors_cross_attention_mask(hf):
    """Which tokens see which image, against the mask transformers' processor builds (to the prompt's end)."""
    _, processor = hf
    for prompt, count in ((f"{BOS}a {IMAGE} b c", 1), (f"{BOS}a {IMAGE} b {IMAGE} c d", 2),
                          (f"{BOS}{IMAGE}{IMAGE} b {IMAGE}{IMAGE}{IMAGE} c", 5)):
        images = [picture(40, 40, i) for i in range(count)]
        enc = processor(text=[prompt], images=[images], return_tensors="pt")
        ids, mask = enc["input_ids"][0], enc["cross_attention_mask"][0, :, :, 0]  # [tokens, images], first tile
        locations = (ids == processor.image_token_id).nonzero().flatten().tolist()
        spans = cross_attention_spans(locations)
        expected = torch.zeros_like(mask)
        for image, (start, end) in enumerate(spans):
            expected[start:min(end, len(ids)), image] = 1
        assert torch.equal(mask, expected), prompt
        assert spans[-1][1] == OPEN_END


def test_chunked_prefill_through_the_images(tiny_mllama_dir, hf):
    """8-token chunks: the images are encoded once, at the first chunk (its text attends to all of them), and every
    later chunk and decode step reads their kept K/V."""
    prompt = f"{BOS}{TURN}Here is a longer question before {IMAGE} the first, and {IMAGE} the second one.{REPLY}"
    check_chunked_prefill(tiny_mllama_dir, hf, prompt, [picture(60, 30, 5), picture(30, 80, 6)])


def test_prefix_cache_shares_only_the_same_images(tiny_mllama_dir, hf):
    """A repeated image reuses the whole prompt's KV and its K/V. The same text with another image, or with none,
    shares nothing: its text before the image attended to the image (a text-only prompt skips cross-attention)."""
    prompt, images = CASES["one image"]
    other = [picture(30, 80, 9)]
    with Engine(model_path=str(tiny_mllama_dir), dtype="float32") as e:
        first = e.generate(prompt, GREEDY, return_logits=True, image_data=images)
        again = e.generate(prompt, GREEDY, return_logits=True, image_data=images)
        assert again["meta_info"]["cached_tokens"] == again["meta_info"]["prompt_tokens"] - 1
        assert again["output_ids"] == first["output_ids"]
        assert e.runner.model.encoder_cache.stores == 1
        changed = e.generate(prompt, GREEDY, return_logits=True, image_data=other)
        assert changed["meta_info"]["cached_tokens"] == 0
        text = prompt.replace(IMAGE, "")
        e.generate(text, GREEDY)
        after_text = e.generate(prompt, GREEDY, return_logits=True, image_data=images)
    assert_same(again, hf_generate(hf, prompt, images))
    assert_same(changed, hf_generate(hf, prompt, other))
    assert_same(after_text, hf_generate(hf, prompt, images))


def test_chat_with_the_hub_template(engine, hf):
    """The model's own template (Llama-3.2-Vision-Instruct style: images where they stand among the texts, no
    default system turn when there are images) renders OpenAI image parts as transformers' processor renders its
    messages, and the answer is transformers'."""
    from mmserve.tokenizer.chat_template import render_chat

    images = [picture(70, 40, 7), picture(40, 70, 8)]
    _, processor = hf

    def messages(*images: dict) -> list[dict]:
        return [{"role": "user", "content": [images[0], {"type": "text", "text": "What is this? "}, images[1]]}]

    prompt = processor.apply_chat_template(messages({"type": "image"}, {"type": "image"}), add_generation_prompt=True)
    assert prompt == f"{BOS}{TURN}{IMAGE}What is this? {IMAGE}{REPLY}"
    chat = messages(*({"type": "image_url", "image_url": {"url": image_data_url(img)}} for img in images))
    assert render_chat(engine.tokenizer, chat, engine.chat_template) == prompt
    assert render_chat(engine.tokenizer, chat, "llama_3_vision") == prompt  # the named template, SGLang's name
    ref = hf_generate(hf, prompt, images)
    assert engine.chat(chat, GREEDY)["output_ids"] == ref[0]
