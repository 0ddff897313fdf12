"""Chat message shapes clients really send, end to end through a server, against templates of both content
formats: a text model with a template that takes string content (SmolLM2's own, as every tiny text model here
has it) answering text given as a list of parts (the shape `mmserve.bench.serving --dataset random` sends),
tool turns, `continue_final_message` and a top-level `add_generation_prompt`; and a Qwen2.5-VL served with a
template written like its hub one, which knows videos only as `type == 'video'`, answering a `video_url`."""

from __future__ import annotations

import argparse

import httpx
import pytest
from vl_helpers import QWEN2_VL_STYLE

from mmserve import Engine
from mmserve.bench.serving import build_requests
from mmserve.tokenizer.chat_template import render_chat

GREEDY = {"temperature": 0, "max_tokens": 4}
QUESTION = [{"role": "user", "content": "what is 1+1?"}]
PREFILL = [*QUESTION, {"role": "assistant", "content": "It is"}]


def chat(server, messages: list[dict], **extra) -> httpx.Response:
    return httpx.post(server.base_url + "/chat/completions", timeout=60,
                      json={"model": "m", "messages": messages, **GREEDY, **extra})


def ok(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def prompt_tokens(tokenizer, messages: list[dict], **kwargs) -> int:
    return len(tokenizer.encode(render_chat(tokenizer, messages, None, **kwargs), add_special_tokens=False))


def test_text_parts_on_a_string_content_template(tiny_text_server, tokenizer):
    as_string = ok(chat(tiny_text_server, QUESTION))
    as_parts = ok(chat(tiny_text_server, [{"role": "user", "content": [{"type": "text", "text": "what is 1+1?"}]}]))
    assert as_parts["choices"][0]["message"] == as_string["choices"][0]["message"]
    assert as_parts["usage"]["prompt_tokens"] == as_string["usage"]["prompt_tokens"]
    # several parts are joined with newlines
    two = [{"role": "user", "content": [{"type": "text", "text": "what is"}, {"type": "text", "text": "1+1?"}]}]
    joined = [{"role": "user", "content": "what is\n1+1?"}]
    prompt_len = [ok(chat(tiny_text_server, messages))["usage"]["prompt_tokens"] for messages in (two, joined)]
    assert prompt_len[0] == prompt_len[1]
    # what the serving benchmark sends
    args = argparse.Namespace(seed=0, image_resolution="8x8", num_prompts=2, input_len=6, dataset="random")
    for messages in build_requests(args):
        ok(chat(tiny_text_server, messages))


def test_tool_call_turns_render(tiny_text_server):
    turns = [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "18C"}]},
    ]
    assert ok(chat(tiny_text_server, turns))["usage"]["prompt_tokens"] > 0


def test_continue_final_message_and_add_generation_prompt(tiny_text_server, tokenizer):
    def prompt_len(messages: list[dict], **extra) -> int:
        return ok(chat(tiny_text_server, messages, **extra))["usage"]["prompt_tokens"]

    continued = prompt_len(PREFILL, continue_final_message=True)
    assert continued == prompt_tokens(tokenizer, PREFILL, continue_final_message=True)
    # the same through chat_template_kwargs, and with add_generation_prompt false spelled out
    assert prompt_len(PREFILL, chat_template_kwargs={"continue_final_message": True}) == continued
    assert prompt_len(PREFILL, continue_final_message=True, add_generation_prompt=False) == continued
    # the continued prompt is the plain one without the assistant's end of turn
    plain = prompt_len(PREFILL, add_generation_prompt=False)
    assert plain == prompt_tokens(tokenizer, PREFILL, add_generation_prompt=False) > continued
    assert prompt_len(QUESTION, add_generation_prompt=False) < prompt_len(QUESTION)


@pytest.mark.parametrize(("messages", "extra", "match"), [
    (PREFILL, {"continue_final_message": True, "add_generation_prompt": True}, "cannot both be true"),
    (PREFILL, {"continue_final_message": True, "chat_template_kwargs": {"add_generation_prompt": True}},
     "cannot both be true"),
    (QUESTION, {"continue_final_message": True}, "last message to be an assistant message"),
])
def test_continue_final_message_errors(tiny_text_server, messages, extra, match):
    response = chat(tiny_text_server, messages, **extra)
    assert response.status_code == 400, response.text
    assert match in response.json()["error"]["message"]


def test_video_url_with_a_hub_style_qwen2_5_vl_template(start_server, tiny_qwen2_5_vl_dir, tmp_path_factory):
    from vl_helpers import video_data_url

    folder = tmp_path_factory.mktemp("chat_shapes")
    template = folder / "qwen2_5_vl.jinja"
    template.write_text(QWEN2_VL_STYLE, encoding="utf-8")
    server = start_server(str(tiny_qwen2_5_vl_dir), "--chat-template", str(template))
    url = video_data_url(folder / "clip.mp4", frames=30, fps=10)
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                             {"type": "text", "text": "What happens?"}]}]
    body = ok(chat(server, messages))
    # mmserve's own qwen2-vl template renders the same prompt, so the answer is the engine's with it
    with Engine(model_path=str(tiny_qwen2_5_vl_dir), dtype="float32", chat_template="qwen2-vl") as engine:
        ref = engine.chat(messages, {"temperature": 0, "max_new_tokens": GREEDY["max_tokens"]})
    assert body["choices"][0]["message"]["content"] == ref["text"]
    assert body["usage"]["prompt_tokens"] == ref["meta_info"]["prompt_tokens"] > 18  # three frame pairs
