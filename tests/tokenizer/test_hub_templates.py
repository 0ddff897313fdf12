"""Chat templates written the way models ship them on the Hub, not the way mmserve's named templates are: each
family's own template reads content in its own shape, and `render_chat` must shape OpenAI messages to fit.

- text templates that concatenate `message['content']` as a string (SmolLM2, Llama 3, Qwen2.5 with tools) get
  text parts flattened (newline-joined), a missing content as "", and tool-call arguments as objects;
- the Qwen2-VL / Qwen2.5-VL template, which loops over the parts and knows only `type == 'image'`/`'video'` (or an
  `image`, `image_url` or `video` key), gets OpenAI's `image_url`/`video_url` parts as `{"type": "image"}` and
  `{"type": "video"}`;
- `continue_final_message` cuts the rendering right after the last assistant message's text.

The templates below are written for these tests in the style of the real ones, including their whitespace habits."""

from __future__ import annotations

import copy

import pytest
from vl_helpers import QWEN2_VL_STYLE

from mmserve.multimodal.processor import media_parts
from mmserve.tokenizer.chat_template import NAMED_TEMPLATES, content_format, render_chat

# SmolLM2-Instruct: ChatML with a default system prompt, content concatenated as a string.
SMOLLM2_STYLE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Meta-Llama-3-Instruct: headers, trimmed string content, the BOS token from the tokenizer.
LLAMA3_STYLE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Qwen2.5-Instruct's tool format: calls as <tool_call> JSON with `arguments | tojson`, consecutive tool results
# merged into one user turn of <tool_response> blocks; content read as a string throughout.
QWEN2_5_TOOLS_STYLE = r"""{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
{%- else %}
    {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first)
        or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Llama-3.2-Vision-style: images found by filtering the parts, text read from the first part of a list.
LLAMA3_VISION_STYLE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] | trim }}{%- else %}"
    "{%- for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<|image|>' }}{%- endfor %}"
    "{%- for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{- content['text'] | trim }}{%- endfor %}{%- endif %}{{- '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)


@pytest.mark.parametrize(("template", "expected"), [
    (SMOLLM2_STYLE, "string"),
    (LLAMA3_STYLE, "string"),
    (QWEN2_5_TOOLS_STYLE, "string"),
    (QWEN2_VL_STYLE, "openai"),
    (LLAMA3_VISION_STYLE, "openai"),
    # the loop over the parts through an alias of the content, and of the messages
    ("{% set turns = messages[1:] %}{% for m in turns %}{% set c = m.content %}{% for p in c %}{{ p.text }}"
     "{% endfor %}{% endfor %}", "openai"),
    # the loop in a macro that receives the content, as mmserve's named templates do
    ("{% macro show(c) %}{% for p in c %}{{ p['text'] }}{% endfor %}{% endmacro %}"
     "{% for m in messages %}{{ show(m['content']) }}{% endfor %}", "openai"),
    # no loop, but a part indexed by key: `messages[0]['content'][0]['text']`
    ("{% set system = messages[0]['content'][0]['text'] %}{{ system }}", "openai"),
    # the last message taken with a filter
    ("{% for p in (messages | last)['content'] %}{{ p.text }}{% endfor %}", "openai"),
    # loops over other fields of a message, or a string `content` variable of the template's own, are not parts
    ("{% for m in messages %}{% for call in m['tool_calls'] %}{{ call.name }}{% endfor %}"
     "{{ m['content'] }}{% endfor %}", "string"),
    ("{% for m in messages %}{% set content = m['role'] + m['content'] %}{{ content }}{% endfor %}", "string"),
    # transformers' {% generation %} tag parses
    ("{% for m in messages %}{% generation %}{% for p in m.content %}{{ p.text }}{% endfor %}{% endgeneration %}"
     "{% endfor %}", "openai"),
    ("{% for m in messages %}{{ m['content'] }", "string"),  # a syntax error: rendering will say so
])
def test_content_format_detection(template: str, expected: str) -> None:
    assert content_format(template) == expected


def test_content_format_of_real_and_named_templates(tokenizer) -> None:
    assert content_format(tokenizer.chat_template) == "string"  # SmolLM2's own
    for name, source in NAMED_TEMPLATES.items():
        assert content_format(source) == "openai", name


def user(content) -> list[dict]:
    return [{"role": "user", "content": content}]


@pytest.mark.parametrize("template", [SMOLLM2_STYLE, LLAMA3_STYLE, QWEN2_5_TOOLS_STYLE, None])
def test_text_parts_flattened_for_string_templates(tokenizer, template: str | None) -> None:
    one = user([{"type": "text", "text": "what is 1+1?"}])
    assert render_chat(tokenizer, one, template) == render_chat(tokenizer, user("what is 1+1?"), template)
    two = user([{"type": "text", "text": "first"}, {"type": "text", "text": "second"}])
    assert render_chat(tokenizer, two, template) == render_chat(tokenizer, user("first\nsecond"), template)


def test_exact_flattened_renderings(tokenizer) -> None:
    parts = user([{"type": "text", "text": " what is 1+1? "}])
    assert render_chat(tokenizer, parts, LLAMA3_STYLE) == (
        f"{tokenizer.bos_token}<|start_header_id|>user<|end_header_id|>\n\nwhat is 1+1?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert render_chat(tokenizer, parts, SMOLLM2_STYLE, add_generation_prompt=False) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\n what is 1+1? <|im_end|>\n")


@pytest.mark.parametrize(("kind", "part"), [
    ("image", {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}),
    ("video", {"type": "video_url", "video_url": {"url": "https://example.com/a.mp4"}}),
    ("audio", {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}),
])
def test_string_templates_refuse_media_by_name(tokenizer, kind: str, part: dict) -> None:
    messages = user([{"type": "text", "text": "Look:"}, part])
    with pytest.raises(ValueError, match=rf"messages\[0\]\.content\[1\] is an? {kind} part.*takes text only"):
        render_chat(tokenizer, messages, SMOLLM2_STYLE)


VIDEO_AND_IMAGE = [{"role": "user", "content": [
    {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
    {"type": "video_url", "video_url": {"url": "https://example.com/b.mp4"}},
    {"type": "text", "text": "Compare them."},
]}]


def test_qwen2_vl_hub_template_sees_video_url_as_a_video(tokenizer) -> None:
    original = copy.deepcopy(VIDEO_AND_IMAGE)
    text = render_chat(tokenizer, VIDEO_AND_IMAGE, QWEN2_VL_STYLE)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|video_pad|><|vision_end|>"
        "Compare them.<|im_end|>\n<|im_start|>assistant\n")
    assert text == render_chat(tokenizer, VIDEO_AND_IMAGE, "qwen2-vl")  # mmserve's named template agrees
    # The caller's messages are untouched: the media loader reads its sources from them.
    assert VIDEO_AND_IMAGE == original
    assert media_parts(VIDEO_AND_IMAGE) == [("image", "https://example.com/a.png"),
                                           ("video", {"url": "https://example.com/b.mp4"})]
    # Python callers' `image`/`video` parts (a PIL image, frames) render the same way.
    objects = user([{"type": "image", "image": object()}, {"type": "video", "video": [object()]},
                    {"type": "text", "text": "Compare them."}])
    assert render_chat(tokenizer, objects, QWEN2_VL_STYLE) == text


def test_qwen2_vl_hub_template_keeps_string_content_and_vision_ids(tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, *VIDEO_AND_IMAGE]
    text = render_chat(tokenizer, messages, QWEN2_VL_STYLE, add_vision_id=True)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nPicture 1: <|vision_start|>")
    assert "Video 1: <|vision_start|><|video_pad|><|vision_end|>Compare them." in text


def test_llama3_vision_style_template_gets_image_parts(tokenizer) -> None:
    messages = user([{"type": "text", "text": " Describe. "},
                     {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}])
    assert render_chat(tokenizer, messages, LLAMA3_VISION_STYLE) == (
        f"{tokenizer.bos_token}<|start_header_id|>user<|end_header_id|>\n\n<|image|>Describe.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


TOOL_TURNS = [
    {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Rome?"}]},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}},
        {"id": "2", "type": "function", "function": {"name": "weather", "arguments": {"city": "Rome"}}},
    ]},
    {"role": "tool", "tool_call_id": "1", "content": "18C"},
    {"role": "tool", "tool_call_id": "2", "content": [{"type": "text", "text": "24C"}]},
]


def test_tool_calls_and_results_through_a_hub_tool_template(tokenizer) -> None:
    original = copy.deepcopy(TOOL_TURNS)
    assert render_chat(tokenizer, TOOL_TURNS, QWEN2_5_TOOLS_STYLE) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWeather in Paris and Rome?<|im_end|>\n"
        "<|im_start|>assistant\n"
        # arguments sent as a JSON string reach the template as an object, so `tojson` writes JSON, not a string
        '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n18C\n</tool_response>\n<tool_response>\n24C\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n")
    assert TOOL_TURNS == original


@pytest.mark.parametrize("template", [SMOLLM2_STYLE, LLAMA3_STYLE, None])
def test_tool_turns_render_with_plain_text_templates(tokenizer, template: str | None) -> None:
    # These templates know nothing of tools; the turn with only tool calls renders with empty content.
    text = render_chat(tokenizer, TOOL_TURNS, template)
    assert "Weather in Paris and Rome?" in text and "18C" in text and "24C" in text


def test_arguments_that_are_not_a_json_object_stay_strings(tokenizer) -> None:
    turns = [*TOOL_TURNS[:1], {"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "weather", "arguments": "Paris, please"}}]}]
    assert '"arguments": "Paris, please"}' in render_chat(tokenizer, turns, QWEN2_5_TOOLS_STYLE)


PREFILL = [{"role": "user", "content": "What is the capital of France?"},
           {"role": "assistant", "content": "The capital of France is "}]


@pytest.mark.parametrize(("template", "ending"), [
    (SMOLLM2_STYLE, "<|im_start|>assistant\nThe capital of France is "),
    # the template trims the content, so the trailing space goes too
    (LLAMA3_STYLE, "<|start_header_id|>assistant<|end_header_id|>\n\nThe capital of France is"),
    (QWEN2_VL_STYLE, "<|im_start|>assistant\nThe capital of France is "),
    (None, "<|im_start|>assistant\nThe capital of France is "),
])
def test_continue_final_message(tokenizer, template: str | None, ending: str) -> None:
    text = render_chat(tokenizer, PREFILL, template, continue_final_message=True)
    assert text.endswith(ending)
    # exactly the full rendering without the generation prompt, cut after the content
    full = render_chat(tokenizer, PREFILL, template, add_generation_prompt=False)
    assert full.startswith(text) and len(full) > len(text)
    # text parts of the last message work too, through either content format
    parts = [PREFILL[0], {"role": "assistant", "content": [{"type": "text", "text": "The capital of France is "}]}]
    assert render_chat(tokenizer, parts, template, continue_final_message=True) == text


@pytest.mark.parametrize(("kwargs", "messages", "match"), [
    ({"add_generation_prompt": True}, PREFILL, "continue_final_message and add_generation_prompt cannot both be"),
    ({}, PREFILL[:1], "needs the last message to be an assistant message.*got 'user'"),
    ({}, TOOL_TURNS[:2], "continue_final_message"),  # only tool calls: no text to continue
])
def test_continue_final_message_errors(tokenizer, kwargs: dict, messages: list[dict], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        render_chat(tokenizer, messages, SMOLLM2_STYLE, continue_final_message=True, **kwargs)
